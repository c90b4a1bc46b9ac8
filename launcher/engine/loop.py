"""The training loop: optimiser steps until ``train.max_steps`` or ``train.epochs`` passes, with observers.

``TrainLoop`` counts optimiser steps: it takes each step's micro-batches from
``TrainStep.step_batches``, runs the step and then hands a ``StepReport`` to its observers
(metrics and progress, sample keys, periodic evaluation, checkpoints and preemption:
``observers.py``) in order. Its own state is the step
count and the loader position, which the checkpoint observer saves.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence, get_args

import torch

from clicktower.data.loader import batches_until_epoch
from clicktower.launcher.engine.distributed import gathered_parameters
from clicktower.launcher.engine.step import NonFiniteStep, TrainStep


# Training precisions accelerate knows (its ``mixed_precision``); fp8 is not supported.
Precision = Literal["no", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
DEFAULT_MAX_STEPS = 100


def planned_steps(cfg: "TrainConfig", step: int, loader: Any, accumulation_steps: int) -> int:
    """The optimiser step at which the run ends, from where it stands: ``cfg.max_steps``,
    or with ``cfg.epochs`` the steps taken plus one step per ``accumulation_steps``
    micro-batches the loader still yields in its epochs ``0 .. epochs - 1`` (a step may
    straddle an epoch end; a remainder of fewer makes none). Computed from the data
    position, which a checkpoint restores exactly on any world size: a resume with another
    global batch still ends after ``epochs`` passes (docs/training.md, "Epochs").

    Args:
        cfg: train config.
        step: optimiser steps taken (restored on a resume).
        loader: the ``ClickPairLoader``, at its (restored) position.
        accumulation_steps: micro-batches per optimiser step.
    """
    if cfg.epochs is None:
        return cfg.max_steps
    return step + batches_until_epoch(loader, cfg.epochs) // accumulation_steps


@dataclass
class TrainConfig:
    """Train section of the experiment config.

    Args:
        batch_size: pairs per device per step (the global batch is this x world size).
        max_steps: optimiser steps of the run (100 when neither it nor ``epochs`` is set).
        epochs: instead of ``max_steps``, passes over the training manifest: the run ends
            when the loader reaches the end of its epoch ``epochs - 1`` (the incomplete last global
            batch of each epoch dropped, and a last step of fewer than
            ``gradient_accumulation_steps`` micro-batches), counted from the restored data
            position on every start, so resumes on another world size train ``epochs``
            passes too; the LR schedule decays by the fraction of those pairs read.
            Setting both is an error, and so is ``data.mix`` (an endless stream).
        output_dir: where ``metrics.jsonl``, ``config.yaml`` and ``final/`` go.
        seed: seeds model init, dropout and the data order.
        log_every_steps: one ``metrics.jsonl`` line (and progress update) every N steps.
        mixed_precision: ``bf16`` or ``fp16`` autocast (fp16 with a gradient scaler: CUDA
            only), ``no`` for fp32, or null: what the launcher says (the accelerate config's
            ``mixed_precision`` / ``accelerate launch --mixed_precision``, which reach the
            processes as ``ACCELERATE_MIXED_PRECISION``), else ``no``. A value set here wins
            over the launcher's. ``OUTPUT_DIR/config.yaml`` records the precision the run
            trained in.
        deterministic: deterministic kernels (``torch.use_deterministic_algorithms``) and no
            TF32; bitwise-reproducible runs and resumes need it. null: true on a CPU, false on
            a GPU (TF32 matmuls on, the faster non-deterministic kernels). ``config.yaml``
            records the resolved value.
        progress_bar: show a tqdm bar on rank 0.
        sample_keys_log: every rank appends ``{"step", "keys", "epochs"}`` per step to
            ``output_dir/sample_keys/rank_R.jsonl``: the keys of the samples it trained on
            (all the step's micro-batches under gradient accumulation) and the loader epoch
            of each (one step's micro-batches can straddle an epoch end), for exactly-once
            checks across kills and resumes. Off by default (one line per step).
        resume: ``auto`` (the newest complete checkpoint of the run lineage that
            ``output_dir``'s ``latest`` pointer names, if any), ``none`` (start over; refused
            where ``output_dir`` holds checkpoints), ``new`` (start a new run lineage beside
            the checkpoints there, which it never prunes or resumes), or a checkpoint folder
            (docs/checkpoints.md, "Run lineages").
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
        report_to: experiment trackers, a name or a list (``tensorboard``, ``wandb``, or any
            other accelerate supports: ``comet_ml``, ``aim``, ``mlflow``...); None: none.
            TensorBoard writes under ``output_dir/tensorboard/``; a resumed run continues the
            same tracker run (``launcher/engine/tracking.py``).
    """

    batch_size: int = 32
    max_steps: int | None = None
    epochs: int | None = None
    output_dir: str = "runs/default"
    seed: int = 0
    log_every_steps: int = 10
    mixed_precision: Precision | None = None
    deterministic: bool | None = None
    progress_bar: bool = True
    sample_keys_log: bool = False
    grad_cache_chunk: int | None = None
    resume: str = "auto"
    collective_timeout_s: float = 300.0
    report_to: str | list[str] | None = None

    def __post_init__(self) -> None:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError(f"set train.max_steps or train.epochs, not both (got max_steps={self.max_steps}, "
                             f"epochs={self.epochs})")
        if self.max_steps is None and self.epochs is None:
            self.max_steps = DEFAULT_MAX_STEPS
        for name in ("batch_size", "max_steps", "epochs", "log_every_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.grad_cache_chunk is not None and self.grad_cache_chunk < 1:
            raise ValueError(f"train.grad_cache_chunk must be >= 1 or null, got {self.grad_cache_chunk}")
        if not self.output_dir:
            raise ValueError("train.output_dir must not be empty")
        # The YAML schema checks the Literal; this catches TrainConfig(...) built in Python.
        if self.mixed_precision is not None and self.mixed_precision not in PRECISIONS:
            raise ValueError(f"train.mixed_precision must be one of {', '.join(PRECISIONS)} or null, "
                             f"got {self.mixed_precision!r}")
        if not 0 < self.collective_timeout_s < math.inf:
            raise ValueError(f"train.collective_timeout_s must be > 0 seconds, got {self.collective_timeout_s}")


@dataclass
class StepReport:
    """What one optimiser step did, as observers see it.

    Args:
        step: optimiser steps done (1-based).
        loss: the step's loss, detached, averaged over micro-batches and ranks.
        keys: this rank's sample keys, all micro-batches in order.
        epochs: the loader epoch of each key.
        pairs: pairs trained on in this step over all ranks.
        step_time_s: wall time of the step itself (on CUDA without a synchronisation: the
            host-side time, which the next step's wait absorbs).
        data_wait_s: wall time spent waiting for the step's micro-batches from the loader.
    """

    step: int
    loss: torch.Tensor
    keys: list[str]
    epochs: list[int]
    pairs: int
    step_time_s: float = 0.0
    data_wait_s: float = 0.0


class Observer(Protocol):
    """Called by ``TrainLoop``; every rank calls every method (some are collective). An
    observer with a ``state_dict()`` has it saved in checkpoints under its ``name`` and finds
    it in ``loop.observer_states`` on a resumed start."""

    name: str

    def on_start(self, loop: "TrainLoop", resumed: bool) -> None: ...

    def after_step(self, loop: "TrainLoop", report: StepReport) -> None: ...

    def close(self) -> None: ...


class TrainLoop:
    """Runs optimiser steps until ``max_steps`` (``planned_steps``, set by ``fit``), looping
    over epochs.

    Args:
        train_step: the step to run (it holds the accelerator and the model).
        loader: a ``ClickPairLoader`` yielding tokenised micro-batches.
        cfg: train config.
        observers: called in this order after every step.
    """

    def __init__(self, train_step: TrainStep, loader: Any, cfg: TrainConfig,
                 observers: Sequence[Observer] = ()) -> None:
        self.train_step, self.loader, self.cfg = train_step, loader, cfg
        self.observers = list(observers)
        self.step = 0
        self.max_steps = cfg.max_steps   # with cfg.epochs: planned from the data position by fit()
        self.observer_states: dict[str, Any] = {}  # from the checkpoint resumed from

    def state_dict(self) -> dict[str, Any]:
        """The loop's part of a checkpoint: the step count, the data position, and the state
        of every observer that has one (e.g. the tracker run), by observer ``name``."""
        observers = {o.name: o.state_dict() for o in self.observers if hasattr(o, "state_dict")}
        return {"step": self.step, "loader": self.loader.state_dict(), "observers": observers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` output (model/optimiser/RNG: the checkpointer).

        Observers read their part in ``on_start`` from ``observer_states``.
        """
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        self.observer_states = dict(state.get("observers") or {})

    def fit(self, resume_state: dict[str, Any] | None = None) -> None:
        """Train until ``max_steps``: ``cfg.max_steps``, or ``cfg.epochs`` passes over the data.

        Args:
            resume_state: the loop state of the checkpoint resumed from, or None for a fresh
                run (``Checkpointer.resume`` gives it).

        Raises:
            Preempted: after the checkpoint, when a stop signal arrived (checkpoint observer).
            NonFiniteStep: a step's loss or gradient norm is not finite (every rank; no
                checkpoint of it is written).
        """
        if resume_state is not None:
            self.load_state_dict(resume_state)
        accumulation = self.train_step.accumulation_steps
        self.max_steps = planned_steps(self.cfg, self.step, self.loader, accumulation)
        world = self.train_step.accelerator.num_processes
        # The LR schedule counts pairs read: from here a step reads this layout's global
        # batches (a resume on another world size changes it; the pairs read so far stay).
        self.train_step.scheduler.set_layout(self.cfg.batch_size * world * accumulation, self.max_steps)
        # Hugging Face's from_pretrained returns encoders in eval mode: without this a
        # pretrained tower would train with its dropout silently off.
        self.train_step.model.train()
        for observer in self.observers:
            observer.on_start(self, resume_state is not None)
        steps = self.train_step.step_batches(self.loader)
        try:
            while self.step < self.max_steps:
                waited = time.perf_counter()
                group = next(steps)
                started = time.perf_counter()
                try:
                    loss = self.train_step(*group.batches)
                except NonFiniteStep as exc:
                    # Raised before the observers run: this state is never checkpointed.
                    raise NonFiniteStep(f"step {self.step + 1}: {exc}") from None
                self.step += 1
                keys = group.keys
                report = StepReport(self.step, loss, keys, group.key_epochs, len(keys) * world,
                                    time.perf_counter() - started, started - waited)
                for observer in self.observers:
                    observer.after_step(self, report)
        finally:
            steps.close()  # the loader's pass (and its worker processes) ends here
            for observer in self.observers:
                observer.close()


def save_final(accelerator: Any, model: Any, folder: Path, tokenizer: Any) -> Path:
    """Write the trained towers as Hugging Face folders (collective: every rank calls it).

    Args:
        accelerator: the training accelerator.
        model: the prepared model.
        folder: the ``final/`` folder.
        tokenizer: saved beside each tower.
    """
    accelerator.wait_for_everyone()
    with gathered_parameters(accelerator, model):  # ZeRO-3 partitions the weights; all ranks enter
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(folder, tokenizer)
    accelerator.wait_for_everyone()
    return folder
