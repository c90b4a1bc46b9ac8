"""Optimiser and learning-rate schedule: AdamW, linear warmup, then cosine/linear/constant."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from torch import nn


@dataclass
class OptimConfig:
    """Optimiser section of the experiment config.

    Args:
        lr: peak learning rate of the towers.
        logit_scale_lr: learning rate of the temperature (None: same as ``lr``); fine-tuning
            runs use a larger one, or the temperature would barely move.
        weight_decay: AdamW decoupled weight decay (not on biases, norms, temperature).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: linear warmup from 0 to ``lr`` (the pairs of this many steps of the
            run's first layout). A warmup not shorter than the run is warned about: the
            learning rate would never reach ``lr``.
        schedule: decay after warmup, down to ``min_lr_ratio * lr`` at the end of the run, by
            the fraction of the run's pairs read (with ``train.epochs`` across world-size
            changes too: docs/training.md, "Epochs").
        min_lr_ratio: final learning rate as a fraction of the peak.
        max_grad_norm: gradient clipping threshold (None disables clipping).
        implementation: how AdamW runs its update. ``loop``: one tensor at a time (the same
            bits whatever the grouping of parameters into tensors, which ZeRO changes: the
            default, and what the bitwise resume tests rely on); ``foreach``: batched over
            tensors; ``fused``: one fused kernel per tensor (CPU and CUDA; on a 2-core CPU
            the MiniLM update takes 17 ms instead of 137 ms).
    """

    lr: float = 5e-5
    logit_scale_lr: float | None = None
    weight_decay: float = 0.01
    betas: list[float] = None  # type: ignore[assignment]  # filled in __post_init__
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    implementation: Literal["loop", "foreach", "fused"] = "loop"

    def __post_init__(self) -> None:
        if self.betas is None:
            self.betas = [0.9, 0.999]
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.logit_scale_lr is not None and self.logit_scale_lr < 0:
            raise ValueError(f"optim.logit_scale_lr must be >= 0, got {self.logit_scale_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"optim.max_grad_norm must be > 0, got {self.max_grad_norm}")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with three groups: decayed weights, undecayed biases/norms, the temperature.

    Args:
        model: the ``TwoTower`` (shared tower parameters are listed once).
        cfg: optimiser config.
    """
    decay, no_decay, scale = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("log_logit_scale"):
            scale.append(param)
        # Under ZeRO-3's zero.Init (zero3_init_flag: true) a parameter is an empty 1-D
        # partition; ds_shape is its real shape.
        elif len(getattr(param, "ds_shape", param.shape)) < 2:  # biases and LayerNorm weights: decay would only hurt them
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if scale:
        groups.append({"params": scale, "weight_decay": 0.0,
                       "lr": cfg.lr if cfg.logit_scale_lr is None else cfg.logit_scale_lr})
    impl = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[cfg.implementation]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **impl)


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """The schedule's factor on each group's peak learning rate at ``step`` (0-based), for a
    run of ``max_steps`` steps of equal size (``pairs_multiplier`` with a step as the unit).

    Args:
        step: optimiser steps already taken.
        cfg: optimiser config.
        max_steps: total steps of the run.
    """
    return pairs_multiplier(step, SchedulePosition(pairs_per_step=1, total_pairs=max_steps,
                                                   warmup_pairs=cfg.warmup_steps), cfg)


@dataclass
class SchedulePosition:
    """Where the LR schedule stands, counted in pairs read (global data positions, whatever
    the world size): optimiser step ``step`` had read ``pairs`` pairs, and every step from
    there reads ``pairs_per_step`` (global batch x accumulation steps) until ``total_pairs``.
    Saved with the scheduler, so a resume on another world size keeps the pairs read so far.

    Args:
        step: the anchor: optimiser steps taken when the layout was last set.
        pairs: pairs read by then.
        pairs_per_step: pairs each later step reads.
        total_pairs: pairs read when the run ends (where the decay reaches its floor).
        warmup_pairs: ``optim.warmup_steps`` in pairs, fixed by the run's first layout.
    """

    step: int = 0
    pairs: int = 0
    pairs_per_step: int = 1
    total_pairs: int = 1
    warmup_pairs: int = 0

    def pairs_at(self, step: int) -> int:
        """Pairs read before optimiser step ``step + 1`` (``step`` steps taken)."""
        return self.pairs + (step - self.step) * self.pairs_per_step


def pairs_multiplier(step: int, position: SchedulePosition, cfg: OptimConfig) -> float:
    """The schedule's factor at ``step`` (0-based), from the pairs read by then: a linear
    warmup over ``position.warmup_pairs``, then the decay by the fraction of the pairs after
    warmup that have been read. With equal steps this is the step schedule exactly.

    Args:
        step: optimiser steps already taken.
        position: the schedule's position (pairs per step, totals).
        cfg: optimiser config (``schedule``, ``min_lr_ratio``).
    """
    pairs, unit = position.pairs_at(step), position.pairs_per_step
    if pairs < position.warmup_pairs:
        # (step + 1) / warmup_steps in steps; capped where a resume changed the step size.
        return min(1.0, (pairs + unit) / position.warmup_pairs)
    if cfg.schedule == "constant":
        return 1.0
    span = max(unit, position.total_pairs - position.warmup_pairs)
    progress = min(1.0, (pairs - position.warmup_pairs) / span)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


class PairsLR(torch.optim.lr_scheduler.LambdaLR):
    """A ``LambdaLR`` following ``pairs_multiplier``: the schedule's progress is the pairs
    read, so it stays exact when a resume changes the world size (a step then reads another
    number of pairs: ``set_layout``). Its ``SchedulePosition`` saves with its state.

    Args:
        optimizer: the optimiser whose groups it scales.
        cfg: optimiser config.
        pairs_per_step: pairs an optimiser step reads (global batch x accumulation steps).
        max_steps: total steps of the run, as first planned (``set_layout`` corrects it).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, pairs_per_step: int,
                 max_steps: int) -> None:
        self.position = SchedulePosition(0, 0, pairs_per_step, max_steps * pairs_per_step,
                                         cfg.warmup_steps * pairs_per_step)
        super().__init__(optimizer, lambda step: pairs_multiplier(step, self.position, cfg))

    def set_layout(self, pairs_per_step: int, max_steps: int) -> None:
        """From the current step on, each step reads ``pairs_per_step`` pairs and the run
        ends at ``max_steps``; the pairs read so far stay. Re-applies the current step's
        learning rate (the run's total may have moved by an epoch's dropped remainder).

        Args:
            pairs_per_step: pairs an optimiser step reads now.
            max_steps: the step at which the run ends.
        """
        step = self.last_epoch
        pairs = self.position.pairs_at(step)
        self.position = replace(self.position, step=step, pairs=pairs, pairs_per_step=pairs_per_step,
                                total_pairs=pairs + (max_steps - step) * pairs_per_step)
        for group, fn, base in zip(self.optimizer.param_groups, self.lr_lambdas, self.base_lrs):
            group["lr"] = base * fn(step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """LambdaLR's state, the position as a plain dict (checkpoints load weights-only)."""
        state = super().state_dict()
        state["position"] = asdict(self.position)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output; a state saved before positions were kept (no
        ``"position"``) keeps this run's, which counts the restored steps at its step size."""
        state = dict(state_dict)
        position = state.pop("position", None)
        super().load_state_dict(state)
        if position is not None:
            self.position = SchedulePosition(**position)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int,
                    pairs_per_step: int = 1) -> PairsLR:
    """The run's LR schedule, by pairs read (its state saves with the checkpoint).

    Args:
        optimizer: the optimiser whose groups it scales.
        cfg: optimiser config.
        max_steps: total steps of the run, as first planned.
        pairs_per_step: pairs an optimiser step reads (1: a step is the unit).
    """
    return PairsLR(optimizer, cfg, pairs_per_step, max_steps)


@dataclass
class Optimization:
    """What one optimiser step updates with: the (prepared) optimiser, its LR schedule, and
    the clipping threshold.

    Args:
        optimizer: the optimiser, after ``accelerator.prepare``.
        scheduler: its LR schedule (stepped once per optimiser step on every rank).
        max_grad_norm: ``optim.max_grad_norm`` (None: no clipping).
    """

    optimizer: Any
    scheduler: Any
    max_grad_norm: float | None
