"""The training loop: one optimiser step per batch, metrics, progress, final export."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

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
    """

    batch_size: int = 32
    max_steps: int = 100
    output_dir: str = "runs/default"
    seed: int = 0
    log_every_steps: int = 10
    mixed_precision: Literal["no", "bf16"] = "no"
    deterministic: bool = True
    progress_bar: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not self.output_dir:
            raise ValueError("train.output_dir must not be empty")


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (main process only).

    Args:
        path: the ``metrics.jsonl`` file.
        enabled: False on non-main ranks.
    """

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())  # a crash must not lose the lines already reported


class Trainer:
    """Runs the optimisation loop under an ``accelerate.Accelerator``.

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
    """

    def __init__(self, accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, loader: Any, loss_fn: ContrastiveLoss, cfg: TrainConfig,
                 max_grad_norm: float | None, mask_duplicate_items: bool) -> None:
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.loader, self.loss_fn, self.cfg = loader, loss_fn, cfg
        self.max_grad_norm, self.mask_duplicate_items = max_grad_norm, mask_duplicate_items
        self.step = 0
        out = Path(cfg.output_dir)
        self.metrics = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process)

    def train_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """Forward, loss, backward, clip and step on one batch; returns the detached loss."""
        device = self.accelerator.device
        inputs = {k: batch[k].to(device) for k in MODEL_INPUTS}
        with self.accelerator.autocast():
            query_emb, item_emb, logit_scale = self.model(**inputs)
        ids = {}
        if self.mask_duplicate_items:
            ids = {"item_ids": batch["item_ids"].to(device), "query_ids": batch["query_ids"].to(device)}
        loss = self.loss_fn(query_emb, item_emb, logit_scale, **ids)
        self.accelerator.backward(loss)
        if self.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def fit(self) -> None:
        """Train until ``cfg.max_steps``, looping over epochs, logging every few steps."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (cfg.progress_bar and acc.is_main_process))
        window_loss, window_pairs, window_start = 0.0, 0, time.perf_counter()
        while self.step < cfg.max_steps:
            for batch in self.loader:
                loss = self.train_step(batch)
                self.step += 1
                window_loss += float(loss)
                window_pairs += len(batch["keys"]) * acc.num_processes
                bar.update(1)
                if self.step % cfg.log_every_steps == 0 or self.step == cfg.max_steps:
                    elapsed = time.perf_counter() - window_start
                    steps = self.step % cfg.log_every_steps or cfg.log_every_steps
                    record = self.log_record(window_loss / steps, window_pairs / max(elapsed, 1e-9))
                    self.metrics.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", pairs_s=f"{record['pairs_per_sec']:.1f}",
                                    lr=f"{record['lr']:.2e}")
                    window_loss, window_pairs, window_start = 0.0, 0, time.perf_counter()
                if self.step >= cfg.max_steps:
                    break
        bar.close()

    def log_record(self, mean_loss: float, pairs_per_sec: float) -> dict[str, Any]:
        """One metrics line: the mean loss over the logging window, lr, temperature, speed."""
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"loss is {mean_loss} at step {self.step}: lower optim.lr "
                                     "or check the data")
        scale = float(self.accelerator.unwrap_model(self.model).logit_scale().detach())
        return {"step": self.step, "epoch": self.loader.epoch, "loss": mean_loss,
                "lr": self.scheduler.get_last_lr()[0], "temperature": 1.0 / scale,
                "logit_scale": scale, "pairs_per_sec": pairs_per_sec}
