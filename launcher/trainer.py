"""The training loop: one optimiser step per batch (or per k micro-batches with plain
gradient accumulation), metrics, progress, final export.

Works unchanged in one process, under DDP and under DeepSpeed ZeRO-1/2/3 (accelerate
launch). With ``train.grad_cache_chunk`` the local batch is embedded in chunks (GradCache),
so the contrastive batch can exceed what fits in memory with activations.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import nn

from clicktower.launcher.checkpoint import Checkpointer
from clicktower.launcher.distributed import (deepspeed_plugin, gathered_parameters,
                                              gradient_accumulation_steps, mean_over_ranks,
                                              peer_loss_errors)
from clicktower.launcher.preemption import Preempted, PreemptionHandler
from clicktower.modeling.losses import ContrastiveLoss

MODEL_INPUTS = ("query_input_ids", "query_attention_mask", "item_input_ids", "item_attention_mask")


@dataclass
class TrainConfig:
    """Train section of the experiment config.

    Args:
        batch_size: pairs per device per step (the global batch is this x world size).
        max_steps: optimiser steps of the run.
        output_dir: where ``metrics.jsonl``, ``config.yaml`` and ``final/`` go.
        seed: seeds model init, dropout and the data order.
        log_every_steps: one ``metrics.jsonl`` line (and progress update) every N steps.
        mixed_precision: ``bf16`` autocast, or ``no`` for fp32.
        deterministic: ask PyTorch for deterministic kernels (bit-reproducible CPU runs).
        progress_bar: show a tqdm bar on rank 0.
        sample_keys_log: every rank appends ``{"step", "keys", "epochs"}`` per step to
            ``output_dir/sample_keys/rank_R.jsonl``: the keys of the samples it trained on
            (all the step's micro-batches under gradient accumulation) and the loader epoch
            of each (one step's micro-batches can straddle an epoch end), for exactly-once
            checks across kills and resumes. Off by default (one line per step).
        resume: ``auto`` (newest complete checkpoint in ``output_dir``, if any), ``none``, or
            a checkpoint folder.
        grad_cache_chunk: GradCache: embed the local batch in chunks of this many pairs
            without activations, compute the loss and its gradient w.r.t. the embeddings on
            the whole (global) batch, then re-run each chunk with grad and back-propagate the
            cached gradient. Same update as without (bit-for-bit up to float reassociation;
            dropout replays via saved RNG state), activation memory of one chunk. None: off.
        collective_timeout_s: how long any collective (and the process group's set-up) may
            wait for a peer before failing. A dead process closes its sockets and fails its
            peers at once; a cut network or a hung host is only noticed by this timeout, so
            keep it minutes, not PyTorch's default half hour. Longer than the slowest step
            plus a checkpoint write.
    """

    batch_size: int = 32
    max_steps: int = 100
    output_dir: str = "runs/default"
    seed: int = 0
    log_every_steps: int = 10
    mixed_precision: Literal["no", "bf16"] = "no"
    deterministic: bool = True
    progress_bar: bool = True
    sample_keys_log: bool = False
    grad_cache_chunk: int | None = None
    resume: str = "auto"
    collective_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.grad_cache_chunk is not None and self.grad_cache_chunk < 1:
            raise ValueError(f"train.grad_cache_chunk must be >= 1 or null, got {self.grad_cache_chunk}")
        if not self.output_dir:
            raise ValueError("train.output_dir must not be empty")
        if not 0 < self.collective_timeout_s < math.inf:
            raise ValueError(f"train.collective_timeout_s must be > 0 seconds, got {self.collective_timeout_s}")


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (main process only).

    Args:
        path: the ``metrics.jsonl`` file.
        enabled: False on non-main ranks.
    """

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def reset(self) -> None:
        """Start a new file (a fresh run); a resumed run appends to the old one instead."""
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())  # a crash must not lose the lines already reported


class SampleKeysLog:
    """Appends the sample keys one rank trained on, one JSON line per step.

    A step logged twice (before a kill, and again after the resume) keeps its last line, as
    in ``metrics.jsonl``.

    Args:
        path: this rank's ``sample_keys/rank_R.jsonl``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def reset(self) -> None:
        """Start a new file (a fresh run); a resumed run appends to the old one instead."""
        self.path.unlink(missing_ok=True)

    def write(self, step: int, keys: list[str], epochs: list[int]) -> None:
        """Append one step's record.

        Args:
            step: the optimiser step just done (1-based).
            keys: the step's sample keys on this rank, all micro-batches in order.
            epochs: the loader epoch of each key.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            # Closed (so handed to the OS) at once, no fsync: it must survive a SIGKILL of this
            # process, which the page cache does; a power cut is not what it is for.
            fh.write(json.dumps({"step": step, "keys": list(keys), "epochs": list(epochs)}) + "\n")


class Trainer:
    """Runs the optimisation loop under an ``accelerate.Accelerator``.

    One optimiser step consumes k micro-batches from the loader, k being the
    ``gradient_accumulation_steps`` of accelerate or of the DeepSpeed config (1 by default).
    Steps, logs, evaluations, checkpoints and preemption checks all count optimiser steps.

    Args:
        accelerator: the prepared accelerator.
        model: the prepared ``TwoTower`` (possibly DDP-wrapped).
        optimizer: the prepared optimiser.
        scheduler: the prepared LR scheduler.
        loader: a ``ClickPairLoader`` yielding tokenised batches.
        loss_fn: the contrastive loss.
        cfg: train config.
        max_grad_norm: clipping threshold or None.
        mask_duplicate_items: pass item ids to the loss so duplicates are not negatives.
        checkpointer: saves the full state when due and on preemption (None: never).
        preemption: signal handler whose stop request ends training at a step boundary.
        config_yaml: the resolved config, stored in every checkpoint.
        evaluator: held-out retrieval evaluation run every ``eval.every_steps`` (None: never).

    Raises:
        ConfigError: ``train.grad_cache_chunk`` together with gradient accumulation.
    """

    def __init__(self, accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, loader: Any, loss_fn: ContrastiveLoss, cfg: TrainConfig,
                 max_grad_norm: float | None, mask_duplicate_items: bool,
                 checkpointer: Checkpointer | None = None, preemption: PreemptionHandler | None = None,
                 config_yaml: str = "", evaluator: Any = None) -> None:
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.loader, self.loss_fn, self.cfg = loader, loss_fn, cfg
        self.max_grad_norm, self.mask_duplicate_items = max_grad_norm, mask_duplicate_items
        self.checkpointer, self.preemption, self.config_yaml = checkpointer, preemption, config_yaml
        self.last_checkpoint: Path | None = None
        self.evaluator = evaluator
        self.step = 0
        self.deepspeed = deepspeed_plugin(accelerator) is not None
        self.accumulation_steps = gradient_accumulation_steps(accelerator)
        if self.accumulation_steps > 1 and cfg.grad_cache_chunk is not None:
            from clicktower.launcher.config import ConfigError  # config imports this module

            # GradCache's chunk loop drives the sync state itself; nesting it in accumulation
            # would synchronise (DDP) or step (DeepSpeed) after the first micro-batch.
            raise ConfigError(f"train.grad_cache_chunk cannot be combined with gradient_accumulation_steps="
                              f"{self.accumulation_steps}; use GradCache alone (raise train.batch_size)")
        self.last_logit_scale = torch.tensor(float("nan"))
        out = Path(cfg.output_dir)
        self.metrics = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process)
        self.keys_log = SampleKeysLog(out / "sample_keys" / f"rank_{accelerator.process_index}.jsonl") \
            if cfg.sample_keys_log else None

    def train_step(self, *batches: dict[str, Any]) -> torch.Tensor:
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
        losses = []
        for index, batch in enumerate(batches):
            # All but the last micro-batch only accumulate local gradients: no DDP all-reduce,
            # and under DeepSpeed no engine step (accelerate steps the engine at the boundary).
            with self._accumulating(index < len(batches) - 1):
                losses.append(self.forward_backward(batch))
        self.optimizer_step()
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        return mean_over_ranks(self.accelerator, loss)

    def forward_backward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Forward, loss and backward of one (micro-)batch, no optimiser step.

        The gradient is that of loss / k: ``accelerator.backward`` divides by the accumulation
        steps, or under DeepSpeed the engine's backward does (accelerate then does not).

        Args:
            batch: a tokenised batch from the loader.

        Returns:
            This rank's loss, detached and undivided.
        """
        device = self.accelerator.device
        inputs = {k: batch[k].to(device) for k in MODEL_INPUTS}
        ids = {}
        if self.mask_duplicate_items:
            ids = {"item_ids": batch["item_ids"].to(device), "query_ids": batch["query_ids"].to(device)}
        chunks = 1 if self.cfg.grad_cache_chunk is None else self._num_chunks(inputs, self.cfg.grad_cache_chunk)
        if chunks > 1:
            loss = self.grad_cache_backward(inputs, ids, chunks)
        else:
            with self.accelerator.autocast():
                query_emb, item_emb, logit_scale = self.model(**inputs)
            if "hard_negative_ids" in batch:
                # The item rows after the batch's own items are its hard negatives.
                count = batch["num_items"]
                ids["hard_negative_emb"] = item_emb[count:]
                if self.mask_duplicate_items:
                    ids["hard_negative_ids"] = batch["hard_negative_ids"].to(device)
                item_emb = item_emb[:count]
            loss = self.loss_fn(query_emb, item_emb, logit_scale, **ids)
            self.last_logit_scale = logit_scale.detach()
            # Under DeepSpeed this is the engine's backward AND, at an accumulation boundary,
            # its step (clip, optimiser, zero_grad).
            self.accelerator.backward(loss)
        return loss.detach()

    def optimizer_step(self) -> None:
        """Clip, step the optimiser and the LR schedule, zero the gradients."""
        if self.max_grad_norm is not None and not self.deepspeed:
            # DeepSpeed clips inside engine.step (gradient_clipping, filled from
            # optim.max_grad_norm by configure_deepspeed); clipping here would be too late.
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()  # a no-op under DeepSpeed: accelerator.backward stepped the engine
        self.scheduler.step()  # a LambdaLR on the base optimiser's param groups, which ZeRO uses
        self.optimizer.zero_grad(set_to_none=True)

    def _num_chunks(self, inputs: dict[str, torch.Tensor], chunk: int) -> int:
        """Chunks per step, the max over ranks: every rank must run the same number of
        forward/backward calls (DDP broadcasts buffers per forward, ZeRO-3 gathers weights)."""
        n = int(inputs[MODEL_INPUTS[0]].shape[0])
        count = torch.tensor([math.ceil(n / chunk)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.reduce(count, reduction="max")
        count = int(count[0])
        if count > n:
            raise ValueError(f"local batch of {n} pairs cannot be split into {count} chunks")
        return count

    def grad_cache_backward(self, inputs: dict[str, torch.Tensor], ids: dict[str, torch.Tensor],
                            num_chunks: int) -> torch.Tensor:
        """GradCache: the gradients of the full-batch loss with one chunk's activations alive.

        1. Embed each chunk under no_grad, saving the RNG state first.
        2. Loss (cross-device gather included) on the concatenated embeddings, and its
           gradient w.r.t. the embeddings and the logit scale.
        3. Per chunk: restore its RNG state (same dropout), embed with grad, and backward
           the surrogate ``sum(emb * cached_grad)`` through ``accelerator.backward`` -- the
           DeepSpeed engine's own backward under ZeRO -- synchronising only on the last.

        Args:
            inputs: the model inputs of the local batch.
            ids: item/query ids for the loss's duplicate masking.
            num_chunks: how many near-equal chunks (the same on every rank).

        Returns:
            The (local) loss.
        """
        acc, model = self.accelerator, self.model
        n = int(inputs[MODEL_INPUTS[0]].shape[0])
        spans = [(int(t[0]), int(t[-1]) + 1) for t in torch.arange(n).tensor_split(num_chunks)]
        states, queries, items = [], [], []
        with torch.no_grad():
            for a, b in spans:
                states.append(_rng_state(acc.device))
                with acc.autocast():
                    q, i, scale = model(**{k: v[a:b] for k, v in inputs.items()})
                queries.append(q)
                items.append(i)
        query_emb = torch.cat(queries).requires_grad_()
        item_emb = torch.cat(items).requires_grad_()
        scale = scale.detach().requires_grad_()
        loss = self.loss_fn(query_emb, item_emb, scale, **ids)
        query_grad, item_grad, scale_grad = torch.autograd.grad(loss, [query_emb, item_emb, scale])
        self.last_logit_scale = scale.detach()
        for index, (a, b) in enumerate(spans):
            last = index == len(spans) - 1
            _set_rng_state(acc.device, states[index])
            with self._accumulating(not last):
                with acc.autocast():
                    q, i, s = model(**{k: v[a:b] for k, v in inputs.items()})
                surrogate = (q.float() * query_grad[a:b].float()).sum() + (i.float() * item_grad[a:b].float()).sum()
                # The logit scale's whole-batch gradient, spread evenly over the chunks (the
                # scale is the same in each): every chunk's backward then reaches every
                # parameter. Added on the last chunk only, ZeRO-3 applied it twice.
                surrogate = surrogate + s.float() * (scale_grad.float() / len(spans))
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

    def fit(self) -> None:
        """Train until ``cfg.max_steps``, looping over epochs, logging every few steps.

        Raises:
            Preempted: after the checkpoint, when a stop signal arrived.
            PeerLost: a collective failed (a process, host or link died; bounded by
                ``cfg.collective_timeout_s``).
        """
        with peer_loss_errors(lambda: self.step, self.cfg.collective_timeout_s, lambda: self.last_checkpoint):
            self._fit()

    def _fit(self) -> None:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        # Hugging Face's from_pretrained returns encoders in eval mode: without this a
        # pretrained tower would train with its dropout silently off.
        self.model.train()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (cfg.progress_bar and acc.is_main_process))
        window_loss, window_pairs, window_start = 0.0, 0, time.perf_counter()
        for batches, epochs in self._step_batches():
            loss = self.train_step(*batches)
            self.step += 1
            keys = [key for batch in batches for key in batch["keys"]]
            if self.keys_log is not None:
                self.keys_log.write(self.step, keys, [e for batch, e in zip(batches, epochs)
                                                      for _ in batch["keys"]])
            window_loss += float(loss)
            window_pairs += len(keys) * acc.num_processes
            bar.update(1)
            if self.step % cfg.log_every_steps == 0 or self.step == cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                steps = self.step % cfg.log_every_steps or cfg.log_every_steps
                record = self.log_record(window_loss / steps, window_pairs / max(elapsed, 1e-9))
                self.metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", pairs_s=f"{record['pairs_per_sec']:.1f}",
                                lr=f"{record['lr']:.2e}")
                window_loss, window_pairs, window_start = 0.0, 0, time.perf_counter()
            if self.evaluator is not None and self.evaluator.due(self.step):
                self.metrics.write(self.evaluator.run(self.step))  # collective: all ranks
            stop = self.preemption is not None and self.preemption.requested()
            if self.checkpointer is not None and (stop or self.checkpointer.due(self.step)):
                self.save_checkpoint()
            if stop:
                bar.close()
                raise Preempted(self.step, str(self.last_checkpoint) if self.last_checkpoint else None)
        bar.close()

    def _step_batches(self) -> Iterator[tuple[list[dict[str, Any]], list[int]]]:
        """The micro-batches of each remaining optimiser step, k at a time, until max_steps,
        with the loader epoch each came from.

        A step whose micro-batches straddle an epoch end continues into the next epoch (no
        batch is dropped); the loader's position is only read between steps, so a
        checkpoint never holds half a step.
        """
        group: list[dict[str, Any]] = []
        epochs: list[int] = []
        while self.step < self.cfg.max_steps:
            for batch in self.loader:
                group.append(batch)
                # Read while the batch's epoch is current: the loader moves it on only after
                # the epoch's last batch has been taken.
                epochs.append(self.loader.epoch)
                if len(group) == self.accumulation_steps:
                    yield group, epochs
                    group, epochs = [], []
                    if self.step >= self.cfg.max_steps:
                        return

    def state_dict(self) -> dict[str, Any]:
        """The trainer's part of a checkpoint: counters and the data position."""
        return {"step": self.step, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` output (model/optimiser/RNG: the checkpointer)."""
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])

    def start(self, resume_from: Path | None) -> None:
        """Restore a checkpoint (model, optimiser, scheduler, every rank's RNG, counters,
        data position) or begin a fresh run. Collective when resuming.

        Args:
            resume_from: a complete checkpoint folder, or None.
        """
        if resume_from is None:
            self.metrics.reset()
            if self.keys_log is not None:
                self.keys_log.reset()
            return
        self.load_state_dict(self.checkpointer.load(resume_from))
        self.accelerator.print(f"resumed from {resume_from} at step {self.step}")

    def save_final(self, folder: Path, tokenizer: Any, max_query_length: int, max_item_length: int) -> Path:
        """Write the trained towers as Hugging Face folders (collective: every rank calls it).

        Args:
            folder: the ``final/`` folder.
            tokenizer: saved beside each tower.
            max_query_length: query token limit, recorded with the query tower.
            max_item_length: item token limit, recorded with the item tower.
        """
        acc = self.accelerator
        acc.wait_for_everyone()
        with gathered_parameters(acc, self.model):  # ZeRO-3 partitions the weights; all ranks enter
            if acc.is_main_process:
                acc.unwrap_model(self.model).save_pretrained(folder, tokenizer, max_query_length, max_item_length)
        acc.wait_for_everyone()
        return folder

    def save_checkpoint(self) -> Path:
        """Save the complete state at the current step (collective: every rank calls it)."""
        self.last_checkpoint = self.checkpointer.save(self.step, self.state_dict(), self.config_yaml)
        return self.last_checkpoint

    def log_record(self, mean_loss: float, pairs_per_sec: float) -> dict[str, Any]:
        """One metrics line: the mean loss over the logging window, lr, temperature, speed."""
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"loss is {mean_loss} at step {self.step}: lower optim.lr "
                                     "or check the data")
        # From the last forward: under ZeRO-3 the parameter itself is a partition.
        scale = float(self.last_logit_scale)
        return {"step": self.step, "epoch": self.loader.epoch, "loss": mean_loss,
                "lr": self.scheduler.get_last_lr()[0], "temperature": 1.0 / scale,
                "logit_scale": scale, "pairs_per_sec": pairs_per_sec,
                # Bad samples skipped so far, by reason (this rank's counts).
                **{f"data_{k}": v for k, v in self.loader.error_counts().items()}}


def _rng_state(device: torch.device) -> tuple:
    """CPU (and this CUDA device's) RNG state, to replay a chunk's dropout."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
