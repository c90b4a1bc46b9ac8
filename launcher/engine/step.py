"""One optimiser step of the two-tower model, under ``accelerate`` (one process, DDP or
DeepSpeed ZeRO-1/2/3): the grouping of the loader's micro-batches into steps
(``step_batches``), forward and backward of each micro-batch, GradCache when the batch is
embedded in chunks, then clipping, the check that the loss and the gradient norm are finite
(``NonFiniteStep``, every step, before the optimiser), the optimiser and the LR schedule.

``TrainStep`` passes each ``PairBatch`` on without knowing its fields and knows nothing of
logs or checkpoints (``loop.TrainLoop`` counts the steps), so a test can run one step alone
and compare the update with a reference.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from clicktower.data.batch import PairBatch
from clicktower.data.errors import DataError
from clicktower.launcher.engine.distributed import deepspeed_plugin, gradient_accumulation_steps, mean_over_ranks
from clicktower.launcher.engine.optim import Optimization
from clicktower.launcher.errors import ConfigError
from clicktower.modeling.losses import ContrastiveLoss


@dataclass
class StepBatches:
    """The micro-batches of one optimiser step and the loader epoch each came from.

    Args:
        batches: ``gradient_accumulation_steps`` micro-batches, in order.
        epochs: the loader epoch of each (a step may straddle an epoch end).
    """

    batches: list[PairBatch]
    epochs: list[int]

    @property
    def keys(self) -> list[str]:
        """This rank's sample keys, all micro-batches in order."""
        return [key for batch in self.batches for key in batch.keys]

    @property
    def key_epochs(self) -> list[int]:
        """The loader epoch of each of ``keys``."""
        return [epoch for batch, epoch in zip(self.batches, self.epochs) for _ in batch.keys]


class TrainStep:
    """Forward, loss, backward and the optimiser update of one step.

    One optimiser step consumes k micro-batches, k being the ``gradient_accumulation_steps``
    of accelerate or of the DeepSpeed config (1 by default); ``step_batches`` groups them.

    Args:
        accelerator: the prepared accelerator.
        model: the prepared ``TwoTower`` (possibly DDP-wrapped or a DeepSpeed engine).
        loss_fn: the contrastive loss (it owns its duplicate masks: the step passes every id).
        optimization: the prepared optimiser, its LR schedule and the clipping threshold.
        grad_cache_chunk: GradCache chunk size in pairs (``train.grad_cache_chunk``; None: off).

    Raises:
        ConfigError: ``grad_cache_chunk`` together with gradient accumulation.
    """

    def __init__(self, accelerator: Any, model: nn.Module, loss_fn: ContrastiveLoss,
                 optimization: Optimization, grad_cache_chunk: int | None = None) -> None:
        self.accelerator, self.model, self.loss_fn = accelerator, model, loss_fn
        self.optimizer, self.scheduler = optimization.optimizer, optimization.scheduler
        self.max_grad_norm, self.grad_cache_chunk = optimization.max_grad_norm, grad_cache_chunk
        self.deepspeed = deepspeed_plugin(accelerator) is not None
        self.accumulation_steps = gradient_accumulation_steps(accelerator)
        if self.accumulation_steps > 1 and grad_cache_chunk is not None:
            # GradCache's chunk loop drives the sync state itself; nesting it in accumulation
            # would synchronise (DDP) or step (DeepSpeed) after the first micro-batch.
            raise ConfigError(f"train.grad_cache_chunk cannot be combined with gradient_accumulation_steps="
                              f"{self.accumulation_steps}; use GradCache alone (raise train.batch_size)")
        # From the last forward (logged): under ZeRO-3 the parameter itself is a partition.
        self.last_logit_scale = torch.tensor(float("nan"))

    def __call__(self, *batches: PairBatch) -> torch.Tensor:
        """One optimiser step; see ``train_step``."""
        return self.train_step(*batches)

    def train_step(self, *batches: PairBatch) -> torch.Tensor:
        """One optimiser step: forward, loss and backward of each micro-batch, then clip and step.

        Args:
            *batches: the step's micro-batches, exactly ``gradient_accumulation_steps`` of
                them (one batch without accumulation).

        Returns:
            The loss, detached, averaged over the micro-batches and over ranks.
        """
        if len(batches) != self.accumulation_steps:
            raise ValueError(f"one optimiser step takes {self.accumulation_steps} micro-batches "
                             f"(gradient_accumulation_steps), got {len(batches)}")
        losses, total_weights = [], []
        for index, batch in enumerate(batches):
            # All but the last micro-batch only accumulate local gradients: no DDP all-reduce,
            # and under DeepSpeed no engine step (accelerate steps the engine at the boundary).
            with self._accumulating(index < len(batches) - 1):
                losses.append(self.forward_backward(batch))
            total_weights.append(self.loss_fn.last_total_weight)
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        # Averaged over ranks BEFORE the optimiser step: the finite check below must see the
        # same value on every rank, so that all raise (or none) and no rank waits alone.
        loss = mean_over_ranks(self.accelerator, loss)
        self.optimizer_step(loss, total_weights)
        return loss

    def step_batches(self, loader: Iterable[PairBatch]) -> Iterator[StepBatches]:
        """The loader's micro-batches grouped into optimiser steps, ``accumulation_steps`` at
        a time, epoch after epoch without end (the caller stops taking).

        A step whose micro-batches straddle an epoch end continues into the next epoch (no
        batch is dropped); a group is handed out only once complete, so the loader's position
        read between steps never holds half a step.

        Args:
            loader: a ``ClickPairLoader`` (iterated once per epoch; its ``epoch`` is read).
        """
        group: list[PairBatch] = []
        epochs: list[int] = []
        while True:
            for batch in loader:
                group.append(batch)
                # Read while the batch's epoch is current: the loader moves it on only after
                # the epoch's last batch has been taken.
                epochs.append(loader.epoch)
                if len(group) == self.accumulation_steps:
                    yield StepBatches(group, epochs)
                    group, epochs = [], []

    def forward_backward(self, batch: PairBatch) -> torch.Tensor:
        """Forward, loss and backward of one (micro-)batch, no optimiser step.

        The gradient is that of loss / k: ``accelerator.backward`` divides by the accumulation
        steps, or under DeepSpeed the engine's backward does (accelerate then does not).

        Args:
            batch: a tokenised batch from the loader.

        Returns:
            This rank's loss, detached and undivided.
        """
        batch = batch.to(self.accelerator.device)
        chunks = 1 if self.grad_cache_chunk is None else self._num_chunks(batch.num_pairs, self.grad_cache_chunk)
        if chunks > 1:
            return self.grad_cache_backward(batch, chunks)
        with self.accelerator.autocast():
            query_emb, item_emb, logit_scale = self.model(**batch.model_inputs())
        item_emb, hard_negative_emb = batch.split_items(item_emb)
        loss = self.loss_fn(query_emb, item_emb, logit_scale, batch.labels, hard_negative_emb)
        self.last_logit_scale = logit_scale.detach()
        # Under DeepSpeed this is the engine's backward AND, at an accumulation boundary,
        # its step (clip, optimiser, zero_grad).
        self.accelerator.backward(loss)
        return loss.detach()

    def optimizer_step(self, loss: torch.Tensor | None = None, total_weights: list | None = None) -> None:
        """Clip, check that the loss and the gradient norm are finite, step the optimiser and
        the LR schedule, zero the gradients.

        Args:
            loss: the step's loss averaged over ranks (None: not checked).
            total_weights: the global total sample weight of each micro-batch (for the
                error message only).

        Raises:
            NonFiniteStep: the loss or the gradient norm is NaN or infinite (on every rank
                alike); without DeepSpeed the optimiser has not stepped.
        """
        grad_norm = _grad_norm(self.accelerator, self.model, self.max_grad_norm, self.deepspeed)
        _check_finite(loss, grad_norm, total_weights or [], self.deepspeed)
        self.optimizer.step()  # a no-op under DeepSpeed: accelerator.backward stepped the engine
        if not getattr(self.optimizer, "step_was_skipped", False):  # fp16: the scaler skipped an overflow step
            self.scheduler.step()  # a LambdaLR on the base optimiser's param groups, which ZeRO uses
        self.optimizer.zero_grad(set_to_none=True)

    def _num_chunks(self, n: int, chunk: int) -> int:
        """Chunks per step for a local batch of ``n`` pairs, the max over ranks: every rank
        must run the same number of forward/backward calls (DDP broadcasts buffers per
        forward, ZeRO-3 gathers weights).

        Raises:
            ShortGradCacheBatch: some rank's batch has fewer pairs than that count (its bad
                samples were skipped), raised on every rank alike.
        """
        # One collective gives every rank the chunk count and the smallest and largest local
        # batches (the smallest negated, under MAX), so that all ranks raise together: a rank
        # raising alone would leave the others waiting in the loss's gather until the
        # collective timeout.
        local = torch.tensor([math.ceil(n / chunk), -n, n], device=self.accelerator.device)
        both = self.accelerator.reduce(local, reduction="max") if self.accelerator.num_processes > 1 else local
        count, fewest, most = int(both[0]), -int(both[1]), int(both[2])
        if count > fewest:
            raise ShortGradCacheBatch(
                f"GradCache: this step runs {count} chunks of up to train.grad_cache_chunk={chunk} pairs on every "
                f"rank, but a rank's local batch holds only {fewest} pair(s) (bad samples skipped?); "
                f"train.grad_cache_chunk >= {math.ceil(most / max(fewest, 1))} fits batches of {fewest} to {most} pairs")
        return count

    def grad_cache_backward(self, batch: PairBatch, num_chunks: int) -> torch.Tensor:
        """GradCache: the gradients of the full-batch loss with one chunk's activations alive.

        1. Embed each chunk under no_grad, saving the RNG state first.
        2. Loss (cross-device gather included) on the concatenated embeddings, and its
           gradient w.r.t. the embeddings and the logit scale.
        3. Per chunk: restore its RNG state (same dropout), embed with grad, and backward
           the surrogate ``sum(emb * cached_grad)`` through ``accelerator.backward`` -- the
           DeepSpeed engine's own backward under ZeRO -- synchronising only on the last.

        Hard negatives are split into as many chunks as the pairs (``PairBatch.chunks``):
        chunk j embeds its pairs' items followed by the j-th slice of the negatives in ONE
        item-tower call, so the number of forward calls stays the same on every rank (ZeRO-3
        gathers weights per call) whatever its negative count; their embeddings are cached
        and back-propagated like the items'.

        Args:
            batch: the local batch, on the device.
            num_chunks: how many near-equal chunks (the same on every rank).

        Returns:
            The (local) loss.
        """
        acc, model = self.accelerator, self.model
        hard = batch.num_hard_negatives is not None
        chunks = batch.chunks(num_chunks)
        states, queries, items, negatives = [], [], [], []
        with torch.no_grad():
            for chunk in chunks:
                states.append(_rng_state(acc.device))
                with acc.autocast():
                    q, i, scale = model(**chunk.inputs)
                queries.append(q)
                for out, part in zip((items, negatives), chunk.split_items(i)):
                    out.append(part)
        # fp32 leaves: under fp16 autocast the cached gradients would be fp16 and underflow
        # before the scaler sees them.
        leaves = [torch.cat(x).float().requires_grad_() for x in (queries, items, negatives)]
        scale = scale.detach().requires_grad_()
        loss = self.loss_fn(leaves[0], leaves[1], scale, batch.labels, leaves[2] if hard else None)
        *grads, scale_grad = torch.autograd.grad(loss, leaves[:3 if hard else 2] + [scale])
        grads = [g.float() for g in grads] + ([] if hard else [leaves[2].new_zeros(leaves[2].shape)])
        self.last_logit_scale = scale.detach()
        for index, chunk in enumerate(chunks):
            (a, b), (c, d) = chunk.pairs, chunk.negatives
            _set_rng_state(acc.device, states[index])
            with self._accumulating(index < len(chunks) - 1):
                with acc.autocast():
                    q, i, s = model(**chunk.inputs)
                own, hard_rows = chunk.split_items(i.float())
                surrogate = ((q.float() * grads[0][a:b]).sum() + (own * grads[1][a:b]).sum()
                             + (hard_rows * grads[2][c:d]).sum())
                # The logit scale's whole-batch gradient, spread evenly over the chunks (the
                # scale is the same in each): every chunk's backward then reaches every
                # parameter. Added on the last chunk only, ZeRO-3 applied it twice.
                surrogate = surrogate + s.float() * (scale_grad.float() / len(chunks))
                acc.backward(surrogate)
        return loss.detach()

    @contextlib.contextmanager
    def _accumulating(self, accumulate: bool):
        """Backward without gradient synchronisation (all but the last GradCache chunk or
        micro-batch of a step)."""
        if not accumulate:
            yield
        elif self.deepspeed:
            # accelerate's DeepSpeed backward calls engine.set_gradient_accumulation_boundary
            # (sync_gradients) and only runs engine.step() at a boundary: the engine then
            # accumulates (ZeRO-1/2) or reduce-scatters into its partitions (ZeRO-3) and
            # steps once, after the last chunk or micro-batch. (DeepSpeed's no_sync refuses
            # ZeRO-2/3.)
            state = self.accelerator.gradient_state
            state._set_sync_gradients(False)
            try:
                yield
            finally:
                state._set_sync_gradients(True)
        else:
            with self.accelerator.no_sync(self.model):
                yield


class ShortGradCacheBatch(DataError):
    """A rank's local batch is shorter than the step's GradCache chunk count. Raised on every
    rank alike (the counts are all-reduced first), before any forward."""


class NonFiniteStep(FloatingPointError):
    """The loss or the gradient norm of a step is NaN or infinite. Raised on every rank alike
    (both values are the same on every rank), before the step's state can be checkpointed;
    ``TrainLoop`` prefixes the step number."""


def _grad_norm(accelerator: Any, model: nn.Module, max_grad_norm: float | None,
               deepspeed: bool) -> torch.Tensor | None:
    """The global gradient norm of this step, the same on every rank, clipping on the way
    (None where none is known: fp16 loss scaling, where an overflow is the scaler's to skip,
    or a DeepSpeed config with ``compute_grad_norm: false``).

    Without DeepSpeed the gradients are already all-reduced (DDP) when this runs, so every
    rank computes the same norm: the check costs no collective. DeepSpeed's engine stepped
    inside the backward (clipping included) and reports the norm it computed over all
    partitions (ZeRO skips a step whose norm is not finite and reports inf; ZeRO-1/2 under
    bf16 only with ``check_grad_overflow``)."""
    if deepspeed:
        # The engine clipped inside its step (gradient_clipping, filled from
        # optim.max_grad_norm by configure_deepspeed); clipping here would be too late.
        if model.fp16_enabled():
            return None
        norm = model.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm, dtype=torch.float32)
    if getattr(accelerator, "scaler", None) is not None:
        # fp16: inf gradients are the scaler's business (it skips the step and lowers the
        # scale); accelerate's clipping unscales first, as it must.
        if max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        return None
    if max_grad_norm is not None:
        return accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def _check_finite(loss: torch.Tensor | None, grad_norm: torch.Tensor | None, total_weights: list,
                  deepspeed: bool) -> None:
    """Raise ``NonFiniteStep`` when the loss or the gradient norm is not finite: one host sync
    per step (the metrics observer reads the loss every step anyway)."""
    values = [v.detach().float().reshape(()) for v in (loss, grad_norm) if v is not None]
    if not values or bool(torch.isfinite(torch.stack([v.to(values[0].device) for v in values])).all()):
        return
    raise NonFiniteStep(_nonfinite_message(loss, grad_norm, total_weights, deepspeed))


def _nonfinite_message(loss: torch.Tensor | None, grad_norm: torch.Tensor | None, total_weights: list,
                       deepspeed: bool) -> str:
    """What went wrong in a step and what to do, without guessing a cause the numbers rule out."""
    loss_value = float("nan") if loss is None else float(loss)
    norm_value = None if grad_norm is None else float(grad_norm)
    which = "loss" if not math.isfinite(loss_value) else "gradient norm"
    weights = [float(w) for w in total_weights if w is not None]
    weight_text = ", ".join(f"{w:g}" for w in weights) or "unknown"
    norm_text = "unknown" if norm_value is None else f"{norm_value:g}"
    applied = ("the DeepSpeed engine has already stepped (ZeRO skips a non-finite fp32 step)" if deepspeed
               else "the optimiser did not step")
    head = (f"non-finite {which}: loss {loss_value:g}, gradient norm {norm_text}, total sample weight of the "
            f"global batch {weight_text}; {applied} and nothing of this state was checkpointed")
    if weights and all(w == 0 for w in weights):
        # A zero-weight batch has loss 0 and a zero gradient (ContrastiveLoss): if it is here
        # anyway the weights themselves or the model's inputs are bad, not the learning rate.
        hint = "The batch's sample weights are all 0 and still gave a non-finite value: check the weight field"
    else:
        hint = ("Check the step's samples for bad inputs (train.sample_keys_log=true lists them) and, if the "
                "loss was rising before this step, lower optim.lr or optim.max_grad_norm")
    return f"{head}. {hint}; then resume from the newest checkpoint (train.resume=auto)"


def _rng_state(device: torch.device) -> tuple:
    """CPU (and this CUDA device's) RNG state, to replay a chunk's dropout."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
