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

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
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
DS_MODEL_DIR = "pytorch_model"  # accelerate's folder name for the DeepSpeed engine's files
COPIED_AS_IS = ("config.yaml", "custom_checkpoint_*.pkl", "random_states_*.pkl", "scheduler*.bin",
                "scaler.pt", "sampler*.bin")


# Test-only: ``CLICKTOWER_TEST_HOLD_SAVE=STEP`` makes the save of that step stop for up to
# HOLD_SECONDS after every rank's files are written and before the COMPLETE marker, so that a
# test can SIGKILL a real training process in the middle of a save. Unset (always, outside
# tests) it changes nothing; set, the save still completes after the hold.
HOLD_SAVE_ENV = "CLICKTOWER_TEST_HOLD_SAVE"
HOLD_SECONDS = 120.0


def _hold_save_step() -> int | None:
    """The step whose save ``HOLD_SAVE_ENV`` asks to hold, or None (the normal case)."""
    value = os.environ.get(HOLD_SAVE_ENV, "").strip()
    return int(value) if value.isdigit() else None


def _user_error(message: str) -> ValueError:
    """A ``ConfigError`` (one line, exit status 2 in the CLI): imported late, since the config
    module imports this one."""
    from clicktower.launcher.config import ConfigError

    return ConfigError(message)


def topology(accelerator: Any) -> dict[str, int]:
    """The saving/loading topology recorded in ``trainer_state.json``."""
    from clicktower.launcher.distributed import zero_stage

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
    root = Path(output_dir) / CHECKPOINT_DIR
    # A save killed before its rename: never a candidate (no final name), but named, so the
    # user sees which step was lost; the next save removes it.
    for torn in sorted(root.glob(".tmp-step_*")) if root.is_dir() else []:
        logger.warning("skipping checkpoint %s: incomplete (a save interrupted before its %s marker)",
                       torn, COMPLETE)
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
        self.hold_step = _hold_save_step()

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
        # Under DeepSpeed every rank writes its ZeRO shards (pytorch_model/) and its RNG file
        # here; the marker and the rename below wait for all of them (barrier).
        acc.save_state(str(tmp), safe_serialization=True)
        if acc.is_main_process:
            (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
            state = {**trainer_state, "step": step, "topology": topology(acc)}
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
            if step == self.hold_step:
                # Test hook (see HOLD_SAVE_ENV): the files are there, the marker is not yet.
                time.sleep(HOLD_SECONDS)
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
            raise _user_error(f"{folder}: a non-DeepSpeed checkpoint cannot be resumed under DeepSpeed "
                              "ZeRO; resume it without DeepSpeed (DDP or one process)")
        elif now["zero_stage"] > 0 and (saved.get("world_size") not in (None, now["world_size"])
                                        or saved_stage != now["zero_stage"]):
            raise _user_error(
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


def _zero_flat_states(ds_dir: Path) -> tuple[int, int, dict[str, dict[str, Any]], list[dict[str, Any]], Any]:
    """Gather a ZeRO-1/2/3 checkpoint's partitions into per-parameter full tensors.

    Uses DeepSpeed's own ``zero_to_fp32`` reconstruction (which knows each stage's flattening,
    padding and partitioning) once for the fp32 master weights and once more for each Adam
    moment: the moments live in flat tensors laid out exactly like the fp32 partitions.

    Returns:
        ``(zero_stage, world_size, {"fp32"|"exp_avg"|"exp_avg_sq": {name: tensor}},
        base optimiser param_groups (hyper-parameters, lr), step)``.
    """
    import torch
    from deepspeed.utils import zero_to_fp32 as zf

    model_states = zf.parse_model_states(zf.get_model_state_files(str(ds_dir)))
    optim = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
             for f in zf.get_optim_files(str(ds_dir))]
    stage = int(optim[0]["zero_stage"])
    world = optim[0]["partition_count"]
    world = max(world) if isinstance(world, list) else int(world)
    if world != len(optim):
        raise _user_error(f"{ds_dir}: {len(optim)} optimizer shards for a world size of {world}")
    if stage <= 2:
        fp32 = [o["single_partition_of_fp32_groups"] for o in optim]
        base = [o["base_optimizer_state"] for o in optim]
    else:
        fp32 = [o["fp32_flat_groups"] for o in optim]
        base = [o["optimizer_state_dict"] for o in optim]
    flats = {"fp32": fp32}
    groups = len(fp32[0])
    for key in ("exp_avg", "exp_avg_sq"):
        flats[key] = [[b["state"][g][key] for g in range(groups)] for b in base]
    merged = {}
    for key, flat in flats.items():
        if stage <= 2:
            full = zf._get_fp32_state_dict_from_zero2_checkpoint(world, flat, model_states, True,
                                                                 optim[0].get("param_alignment_paddings"))
        else:
            full = zf._get_fp32_state_dict_from_zero3_checkpoint(world, flat, model_states, True)
        trainable = {name for shapes in model_states[0].param_shapes for name in shapes}
        # ZeRO-3 gives lazy GatheredTensors; .contiguous() materialises them (a no-op on tensors).
        merged[key] = {k: v.contiguous() for k, v in full.items() if k in trainable}
    return stage, world, merged, base[0]["param_groups"], base[0]["state"][0]["step"]


def convert_to_ddp(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Turn a DeepSpeed ZeRO checkpoint folder into an accelerate (non-DeepSpeed) one that
    resumes on any number of processes without DeepSpeed.

    Writes ``model.safetensors`` (consolidated fp32 weights, frozen ones included),
    ``optimizer.bin`` (a ``torch.optim.AdamW`` state dict built by ``build_optimizer`` from
    the checkpoint's config, with every parameter's ``exp_avg``, ``exp_avg_sq``, step and the
    groups' current lr), copies the scheduler, RNG and config files, records the conversion in
    ``trainer_state.json`` and writes a ``COMPLETE`` marker last.

    Args:
        src: a DeepSpeed checkpoint folder (with ``pytorch_model/``).
        dst: the output folder (must not exist).

    Returns:
        A summary (source, stage, world size, parameter count).
    """
    import torch
    from safetensors.torch import save_model

    from clicktower.launcher.config import load_config
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from clicktower.launcher.optim import build_optimizer
    from clicktower.modeling.towers import TwoTower

    src, dst = Path(src), Path(dst)
    if not (src / DS_MODEL_DIR).is_dir():
        raise _user_error(f"{src}: not a DeepSpeed checkpoint (no {DS_MODEL_DIR}/ folder)")
    if dst.exists():
        raise FileExistsError(f"{dst}: already exists")
    cfg = load_config(src / "config.yaml")
    stage, world, merged, groups, step = _zero_flat_states(src / DS_MODEL_DIR)
    model = TwoTower.from_config(cfg.model)
    own = model.state_dict()
    weights = get_fp32_state_dict_from_zero_checkpoint(str(src), tag=DS_MODEL_DIR)  # frozen ones and buffers too
    # A parameter DeepSpeed saw with another (numel-preserving) shape, e.g. a 0-dim scalar as [1].
    weights = {k: v.reshape(own[k].shape) if k in own and v.numel() == own[k].numel() else v
               for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (model.shared and k.startswith("item_tower."))]
    if missing or unexpected:
        raise _user_error(f"{src}: weights do not match the config's model "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    optimizer = build_optimizer(model, cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    if len(groups) != len(optimizer.param_groups):
        raise _user_error(f"{src}: {len(groups)} optimiser groups saved, "
                          f"{len(optimizer.param_groups)} built")
    for saved, group in zip(groups, optimizer.param_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})
        for param in group["params"]:
            name = names[id(param)]
            if name not in merged["exp_avg"]:
                raise _user_error(f"{src}: no optimiser state for {name}")
            optimizer.state[param] = {
                "step": torch.as_tensor(step, dtype=torch.float32).clone(),
                "exp_avg": merged["exp_avg"][name].reshape(param.shape).clone(),
                "exp_avg_sq": merged["exp_avg_sq"][name].reshape(param.shape).clone()}
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.bin")
    for pattern in COPIED_AS_IS:
        for path in src.glob(pattern):
            shutil.copy2(path, tmp / path.name)
    state = json.loads((src / TRAINER_STATE).read_text())
    state["topology"] = {**state.get("topology", {}), "zero_stage": 0,
                         "converted_from": {"zero_stage": stage, "world_size": world, "path": str(src)}}
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
    write_complete_marker(tmp, int(state["step"]))
    os.replace(tmp, dst)
    return {"source": str(src), "out": str(dst), "zero_stage": stage, "world_size": world,
            "step": int(state["step"]), "parameters": len(names)}
