"""Crash-safe checkpoints: everything that defines a training step, saved and restored in one place.

Layout::

    OUTPUT_DIR/checkpoints/
        step_00000800/            complete checkpoints only (renamed into place when done)
            model / optimizer / scheduler / RNG files   (accelerate ``save_state``: one file set
                                                         per rank, DeepSpeed ZeRO shards included)
            trainer_state.json    step, data loader position, counters
            config.yaml           the resolved experiment config
            COMPLETE              checksums of every file above, written last
        .tmp-step_00001000/       a save in progress (ignored, removed by the next save)
        latest                    name of the newest complete checkpoint, replaced atomically

A kill at any moment leaves either the previous checkpoint set or a complete new one;
``resume=auto`` takes the newest checkpoint whose ``COMPLETE`` marker and checksums hold
and names every one it skips.

``trainer_state.json`` records the saving topology (``world_size``, ``zero_stage``). A
DeepSpeed checkpoint (``pytorch_model/`` ZeRO shards) resumed without DeepSpeed -- e.g. on
one process, or under DDP -- is converted on the fly (``convert_to_ddp``: consolidated fp32
weights, AdamW moments and step gathered from the shards, scheduler, RNG files, trainer
state); ``clicktower ckpt convert`` does the same offline. What a world-size change keeps:
weights, optimiser moments and step, LR schedule position, and the data position (a global
sample count, so every sample is still seen exactly once). It cannot keep per-rank RNG
streams: ranks that exist in both topologies get their saved state back, new ranks keep
their seeded state.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clicktower.launcher.engine.checkpoint_files import (CHECKPOINT_DIR, COMPLETE, DS_MODEL_DIR, LATEST,
                                                         TRAINER_STATE, check_checkpoint, find_resume_checkpoint,
                                                         fsync_dir, list_checkpoints, step_dir_name,
                                                         write_atomic, write_complete_marker)
from clicktower.launcher.engine.convert import convert_to_ddp
from clicktower.launcher.engine.distributed import zero_stage
from clicktower.launcher.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["CheckpointConfig", "Checkpointer", "check_checkpoint", "find_resume_checkpoint",
           "list_checkpoints", "topology"]


def topology(accelerator: Any) -> dict[str, int]:
    """The saving/loading topology recorded in ``trainer_state.json``."""
    return {"world_size": int(accelerator.num_processes), "zero_stage": zero_stage(accelerator)}


@dataclass
class CheckpointConfig:
    """Checkpoint section of the experiment config.

    Args:
        every_steps: save every N optimiser steps (None: not by steps).
        every_minutes: save when this many minutes passed since the last save (None: not by
            time). Both may be set; the first due triggers a save.
        keep_last: complete checkpoints kept; older ones are deleted after a new one lands.
        verify_checksums: check every file's sha256 before resuming from a checkpoint.
    """

    every_steps: int | None = None
    every_minutes: float | None = None
    keep_last: int = 2
    verify_checksums: bool = True

    def __post_init__(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1, got {self.every_steps}")
        if self.every_minutes is not None and self.every_minutes <= 0:
            raise ValueError(f"checkpoint.every_minutes must be > 0, got {self.every_minutes}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


class Checkpointer:
    """Saves and restores the full training state through an ``accelerate.Accelerator``.

    Model, optimiser, registered objects (LR scheduler), grad scaler and every rank's RNG
    states go through ``accelerator.save_state`` (the DeepSpeed engine writes its ZeRO
    shards, one file set per rank); the trainer's counters, the data loader position and
    the resolved config go into ``trainer_state.json`` and ``config.yaml``.

    Args:
        accelerator: the training accelerator (objects already prepared and registered).
        output_dir: the run's output folder.
        cfg: checkpoint config.
        config_yaml: the resolved experiment config, stored in every checkpoint.
    """

    def __init__(self, accelerator: Any, output_dir: str | Path, cfg: CheckpointConfig,
                 config_yaml: str) -> None:
        self.accelerator, self.cfg, self.config_yaml = accelerator, cfg, config_yaml
        self.root = Path(output_dir) / CHECKPOINT_DIR
        self.last_save_time = time.monotonic()
        self.last_saved: Path | None = None

    def due(self, step: int) -> bool:
        """Whether a save is due after ``step`` (every rank must get the same answer).

        Time-based saves are decided on the main process and broadcast, so that ranks whose
        clocks differ by a hair never disagree.
        """
        by_steps = self.cfg.every_steps is not None and step % self.cfg.every_steps == 0
        if by_steps or self.cfg.every_minutes is None:
            return by_steps
        elapsed = (time.monotonic() - self.last_save_time) / 60.0
        return bool(self._broadcast_flag(elapsed >= self.cfg.every_minutes))

    def _broadcast_flag(self, flag: bool) -> bool:
        import torch
        import torch.distributed as dist

        if self.accelerator.num_processes == 1 or not dist.is_initialized():
            return flag
        tensor = torch.tensor([1 if flag else 0], device=self.accelerator.device)
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Write a complete checkpoint for ``step`` (collective: call on every rank).

        Args:
            step: optimiser steps done.
            trainer_state: counters and loader position (JSON-serialisable).

        Returns:
            The checkpoint folder.
        """
        acc = self.accelerator
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step_*"):  # left by a kill in the middle of a save
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # a re-save of the same step after a resume
                shutil.rmtree(final)
        acc.wait_for_everyone()
        # Under DeepSpeed every rank writes its ZeRO shards (pytorch_model/) and its RNG file
        # here; the marker and the rename below wait for all of them (barrier).
        acc.save_state(str(tmp), safe_serialization=True)
        if acc.is_main_process:
            (tmp / "config.yaml").write_text(self.config_yaml, encoding="utf-8")
            state = {**trainer_state, "step": step, "topology": topology(acc)}
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_complete_marker(tmp, step)
            os.replace(tmp, final)
            fsync_dir(self.root)
            write_atomic(self.root / LATEST, final.name + "\n")  # the pointer last
            self._prune()
        acc.wait_for_everyone()
        self.last_save_time = time.monotonic()
        self.last_saved = final
        return final

    def _prune(self) -> None:
        complete = [p for p in list_checkpoints(self.root.parent) if (p / COMPLETE).is_file()]
        for old in complete[:-self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self, setting: str) -> dict[str, Any] | None:
        """Resolve ``train.resume`` and restore that checkpoint (collective when resuming).

        Args:
            setting: ``auto`` (the newest usable checkpoint of the run, if any), ``none``, or
                a checkpoint folder.

        Returns:
            The trainer state saved with it (step, data position), or None for a fresh run.
        """
        folder = find_resume_checkpoint(self.root.parent, setting, self.cfg.verify_checksums)
        if folder is None:
            return None
        state = self.load(folder)
        self.accelerator.print(f"resumed from {folder} at step {state['step']}")
        return state

    def load(self, folder: Path) -> dict[str, Any]:
        """Restore everything ``save`` wrote; returns the trainer state (collective).

        A DeepSpeed checkpoint resumed without DeepSpeed is converted first (every rank
        converts into its own temporary folder: no shared file system or collective needed).

        Args:
            folder: a complete checkpoint folder.

        Raises:
            ConfigError: a checkpoint that this topology cannot load (the message says why).
        """
        acc = self.accelerator
        state = json.loads((folder / TRAINER_STATE).read_text())
        # The saving topology is the checkpointer's own record, not part of the trainer state.
        saved = state.pop("topology", None) or {"world_size": None, "zero_stage": 0}
        now = topology(acc)
        saved_stage = int(saved.get("zero_stage") or 0)
        is_ds_checkpoint = (folder / DS_MODEL_DIR).is_dir()
        if now["zero_stage"] == 0 and is_ds_checkpoint:
            if acc.is_main_process:  # checkpoints older than the topology record say "?"
                logger.warning("%s: DeepSpeed ZeRO-%s checkpoint of %s processes, resumed without DeepSpeed on %s: "
                               "converting (weights, optimiser moments, schedule, data position kept)",
                               folder, saved_stage or "?", saved.get("world_size") or "?", now["world_size"])
            with tempfile.TemporaryDirectory(prefix="clicktower-ckpt-") as tmp:
                converted = Path(tmp) / folder.name
                convert_to_ddp(folder, converted)
                acc.load_state(str(converted))
        elif now["zero_stage"] > 0 and not is_ds_checkpoint:
            raise ConfigError(f"{folder}: a non-DeepSpeed checkpoint cannot be resumed under DeepSpeed "
                              "ZeRO; resume it without DeepSpeed (DDP or one process)")
        elif now["zero_stage"] > 0 and (saved.get("world_size") not in (None, now["world_size"])
                                        or saved_stage != now["zero_stage"]):
            raise ConfigError(
                f"{folder}: saved by ZeRO-{saved_stage} on {saved.get('world_size')} processes, resumed by "
                f"ZeRO-{now['zero_stage']} on {now['world_size']}: resume it without DeepSpeed (it is converted "
                "automatically) or on the same topology")
        else:
            acc.load_state(str(folder))
        if saved.get("world_size") not in (None, now["world_size"]) and acc.is_main_process:
            # accelerate restores random_states_{rank}.pkl where it exists and skips it otherwise.
            logger.warning("%s: saved by %s processes, resumed on %s: weights, optimiser, schedule and data "
                           "position are restored; per-rank RNG streams only for ranks below %s",
                           folder, saved["world_size"], now["world_size"],
                           min(saved["world_size"], now["world_size"]))
        return state
