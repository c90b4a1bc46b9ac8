"""Converting DeepSpeed ZeRO checkpoints, on the fly (``Checkpointer.load``) or offline
(``clicktower ckpt convert``):

* ``convert_to_ddp``: an accelerate (non-DeepSpeed) checkpoint, resumable on any number of
  processes without DeepSpeed: consolidated fp32 weights, AdamW moments and step, scheduler,
  RNG files, trainer state.
* ``convert_to_universal``: DeepSpeed's universal checkpoint (``ds_to_universal``: one folder
  per parameter with its fp32 weights, Adam moments and step), which a ZeRO engine of any
  world size loads (``load_universal``), plus the same accelerate files and trainer state.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

from clicktower.launcher.engine.checkpoint.files import (COPIED_AS_IS, DS_MODEL_DIR, TRAINER_STATE,
                                                         write_complete_marker)
from clicktower.launcher.engine.optim import OptimConfig, build_optimizer
from clicktower.launcher.engine.schema import from_dict, read_yaml_sections
from clicktower.launcher.errors import ConfigError
from clicktower.modeling.towers import TwoTower, TwoTowerConfig


def _model_and_optim_config(path: Path) -> tuple[TwoTowerConfig, OptimConfig]:
    """The model and optimiser sections of a checkpoint's ``config.yaml`` (all the conversion
    rebuilds; the other sections are not read)."""
    raw = read_yaml_sections(path)
    return (from_dict(TwoTowerConfig, raw.get("model", {}), "model."),
            from_dict(OptimConfig, raw.get("optim", {}), "optim."))


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
        raise ConfigError(f"{ds_dir}: {len(optim)} optimizer shards for a world size of {world}")
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

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    src, dst = Path(src), Path(dst)
    if not (src / DS_MODEL_DIR).is_dir():
        raise ConfigError(f"{src}: not a DeepSpeed checkpoint (no {DS_MODEL_DIR}/ folder)")
    if dst.exists():
        raise FileExistsError(f"{dst}: already exists")
    model_cfg, optim_cfg = _model_and_optim_config(src / "config.yaml")
    stage, world, merged, groups, step = _zero_flat_states(src / DS_MODEL_DIR)
    model = TwoTower.from_config(model_cfg)
    own = model.state_dict()
    weights = get_fp32_state_dict_from_zero_checkpoint(str(src), tag=DS_MODEL_DIR)  # frozen ones and buffers too
    # A parameter DeepSpeed saw with another (numel-preserving) shape, e.g. a 0-dim scalar as [1].
    weights = {k: v.reshape(own[k].shape) if k in own and v.numel() == own[k].numel() else v
               for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (model.shared and k.startswith("item_tower."))]
    if missing or unexpected:
        raise ConfigError(f"{src}: weights do not match the config's model "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    optimizer = build_optimizer(model, optim_cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    if len(groups) != len(optimizer.param_groups):
        raise ConfigError(f"{src}: {len(groups)} optimiser groups saved, "
                          f"{len(optimizer.param_groups)} built")
    for saved, group in zip(groups, optimizer.param_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})
        for param in group["params"]:
            name = names[id(param)]
            if name not in merged["exp_avg"]:
                raise ConfigError(f"{src}: no optimiser state for {name}")
            optimizer.state[param] = {
                "step": torch.as_tensor(step, dtype=torch.float32).clone(),
                "exp_avg": merged["exp_avg"][name].reshape(param.shape).clone(),
                "exp_avg_sq": merged["exp_avg_sq"][name].reshape(param.shape).clone()}
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.bin")
    step = _copy_accelerate_files(src, tmp, stage, world, "ddp")
    state = json.loads((tmp / TRAINER_STATE).read_text())
    state["topology"]["zero_stage"] = 0  # resumes without DeepSpeed
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
    write_complete_marker(tmp, step)
    os.replace(tmp, dst)
    return {"source": str(src), "out": str(dst), "zero_stage": stage, "world_size": world,
            "step": step, "parameters": len(names)}


def _copy_accelerate_files(src: Path, tmp: Path, stage: int, world: int | None, kind: str) -> int:
    """Copy the scheduler, RNG, config files; write ``trainer_state.json`` recording the
    conversion. Returns the step."""
    for pattern in COPIED_AS_IS:
        for path in src.glob(pattern):
            shutil.copy2(path, tmp / path.name)
    state = json.loads((src / TRAINER_STATE).read_text())
    state["topology"] = {**state.get("topology", {}),
                         "converted_from": {"zero_stage": stage, "world_size": world, "path": str(src), "to": kind}}
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
    return int(state["step"])


def convert_to_universal(src: str | Path, dst: str | Path, workers: int = 1) -> dict[str, Any]:
    """Turn a DeepSpeed ZeRO-1/2/3 checkpoint folder into a universal one that a ZeRO engine
    of any number of processes resumes from (same stage; ``Checkpointer.load`` sets the
    engine's ``load_universal``).

    Writes ``pytorch_model/`` through DeepSpeed's ``ds_to_universal`` (every parameter's
    fp32 weights, ``exp_avg``, ``exp_avg_sq`` and step, gathered from all ranks' partitions;
    the model-states files copied), copies the scheduler, RNG and config files, records the
    conversion in ``trainer_state.json`` and writes a ``COMPLETE`` marker last.

    Args:
        src: a DeepSpeed checkpoint folder (with ``pytorch_model/``).
        dst: the output folder (must not exist).
        workers: processes extracting and merging the shards (1: in this process, the
            choice inside a training process).

    Returns:
        A summary (source, stage, world size, step).
    """
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    from deepspeed.utils import zero_to_fp32 as zf

    src, dst = Path(src), Path(dst)
    if not (src / DS_MODEL_DIR).is_dir():
        raise ConfigError(f"{src}: not a DeepSpeed checkpoint (no {DS_MODEL_DIR}/ folder)")
    if (src / DS_MODEL_DIR / "zero").is_dir():
        raise ConfigError(f"{src}: already a universal checkpoint")
    if dst.exists():
        raise FileExistsError(f"{dst}: already exists")
    optim_files = zf.get_optim_files(str(src / DS_MODEL_DIR))
    head = torch_load(optim_files[0])["optimizer_state_dict"]
    stage = int(head["zero_stage"])
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    args = argparse.Namespace(input_folder=str(src / DS_MODEL_DIR), output_folder=str(tmp / DS_MODEL_DIR),
                              num_extract_workers=workers, num_merge_workers=workers, keep_temp_folder=False,
                              strict=True,
                              # clicktower's model carries no tensor-parallel layout description;
                              # DeepSpeed's default one (no TP) is what it needs.
                              inject_missing_state=True)
    log = io.StringIO()
    try:  # DeepSpeed prints every stage and a progress bar per stage
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal(args)
    except Exception as exc:
        tail = " | ".join(log.getvalue().strip().splitlines()[-3:])
        raise RuntimeError(f"{src}: universal conversion failed: {exc} ({tail})") from exc
    step = _copy_accelerate_files(src, tmp, stage, len(optim_files), "universal")
    write_complete_marker(tmp, step)
    os.replace(tmp, dst)
    return {"source": str(src), "out": str(dst), "zero_stage": stage, "world_size": len(optim_files),
            "step": step, "format": "universal"}


def torch_load(path: str | Path) -> Any:
    """A DeepSpeed checkpoint file on the CPU.

    Args:
        path: the file (pickled objects beyond tensors: only for checkpoints this run or
            DeepSpeed wrote, never untrusted files).
    """
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)
