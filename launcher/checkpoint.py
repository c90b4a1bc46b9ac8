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
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
COMPLETE = "COMPLETE"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")


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


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_complete_marker(folder: Path, step: int) -> None:
    """Checksum every file of a checkpoint folder and write the ``COMPLETE`` marker last."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE):
        files[str(path.relative_to(folder))] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    _write_atomic(folder / COMPLETE, json.dumps({"step": step, "files": files}, indent=1) + "\n")


def check_checkpoint(folder: Path, verify_checksums: bool = True) -> str | None:
    """Why ``folder`` is not a usable checkpoint, or None when it is.

    Args:
        folder: a ``step_XXXXXXXX`` folder.
        verify_checksums: also recompute every file's sha256 (else sizes only).
    """
    marker = folder / COMPLETE
    if not marker.is_file():
        return "incomplete (no COMPLETE marker)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return "corrupt COMPLETE marker"
    for name, info in files.items():
        path = folder / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != info["bytes"]:
            return f"size mismatch in {name}"
        if verify_checksums and sha256_file(path) != info["sha256"]:
            return f"checksum mismatch in {name}"
    if TRAINER_STATE not in files:
        return f"no {TRAINER_STATE}"
    return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first (complete or not)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)),
                  key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_resume_checkpoint(output_dir: str | Path, resume: str, verify_checksums: bool = True) -> Path | None:
    """Resolve ``train.resume``: ``none``, ``auto`` (newest usable checkpoint) or a path.

    Args:
        output_dir: the run's output folder.
        resume: ``none``, ``auto`` or a checkpoint folder.
        verify_checksums: recompute checksums while checking.

    Returns:
        The checkpoint folder, or None to start from scratch.

    Raises:
        FileNotFoundError: an explicit path that is not a usable checkpoint.
    """
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        problem = check_checkpoint(path, verify_checksums) if path.is_dir() else "no such folder"
        if problem:
            raise FileNotFoundError(f"train.resume={resume}: not a usable checkpoint: {problem}")
        return path
    for candidate in reversed(list_checkpoints(output_dir)):
        problem = check_checkpoint(candidate, verify_checksums)
        if problem is None:
            return candidate
        logger.warning("skipping checkpoint %s: %s", candidate, problem)
    return None


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
    """

    def __init__(self, accelerator: Any, output_dir: str | Path, cfg: CheckpointConfig) -> None:
        self.accelerator, self.cfg = accelerator, cfg
        self.root = Path(output_dir) / CHECKPOINT_DIR
        self.last_save_time = time.monotonic()

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

    def save(self, step: int, trainer_state: dict[str, Any], config_yaml: str) -> Path:
        """Write a complete checkpoint for ``step`` (collective: call on every rank).

        Args:
            step: optimiser steps done.
            trainer_state: counters and loader position (JSON-serialisable).
            config_yaml: the resolved config.

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
        acc.save_state(str(tmp), safe_serialization=True)
        if acc.is_main_process:
            (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
            (tmp / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2) + "\n")
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_complete_marker(tmp, step)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            _write_atomic(self.root / LATEST, final.name + "\n")  # the pointer last
            self._prune()
        acc.wait_for_everyone()
        self.last_save_time = time.monotonic()
        return final

    def _prune(self) -> None:
        complete = [p for p in list_checkpoints(self.root.parent) if (p / COMPLETE).is_file()]
        for old in complete[:-self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, folder: Path) -> dict[str, Any]:
        """Restore everything ``save`` wrote; returns the trainer state (collective).

        Args:
            folder: a complete checkpoint folder.
        """
        self.accelerator.load_state(str(folder))
        return json.loads((folder / TRAINER_STATE).read_text())
