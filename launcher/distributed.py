"""Launcher-side glue for multi-process training: DeepSpeed config filling, warnings,
ZeRO-3 parameter gathering and rank reductions. All torch.distributed / DeepSpeed
awareness of the training loop lives here and in ``trainer.py``; models and losses never
read the rank or the environment.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

import torch

logger = logging.getLogger("clicktower")

NEGATIVE_POOL_WARNING = (
    "gradient_accumulation_steps={steps} with a contrastive loss: each micro-batch only sees "
    "its own {batch} x {world} pairs as negatives, so accumulation does NOT reproduce a "
    "{steps}x larger batch (the loss is not a sum over micro-batches). Use "
    "train.grad_cache_chunk to get the large negative pool at small memory instead.")


def deepspeed_plugin(accelerator: Any) -> Any:
    """The accelerate DeepSpeed plugin, or None when not running under DeepSpeed."""
    return getattr(accelerator.state, "deepspeed_plugin", None)


def zero_stage(accelerator: Any) -> int:
    """The ZeRO stage (0 without DeepSpeed)."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return 0
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def configure_deepspeed(accelerator: Any, batch_size: int, max_grad_norm: float | None) -> None:
    """Fill the DeepSpeed config's ``auto`` values that accelerate cannot infer (we prepare
    no dataloader) and make clipping follow ``optim.max_grad_norm``. No-op without DeepSpeed.

    Under DeepSpeed the engine clips inside its ``step`` (``gradient_clipping``), so the
    trainer must not clip itself; accelerate would otherwise fill ``auto`` with 1.0.

    Args:
        accelerator: the ``Accelerator``, before ``prepare``.
        batch_size: pairs per process per step (``train.batch_size``).
        max_grad_norm: ``optim.max_grad_norm`` (None: no clipping).

    Raises:
        ConfigError: the DeepSpeed file sets ``gradient_clipping`` or the micro batch to a
            value that disagrees with the experiment config.
    """
    from clicktower.launcher.config import ConfigError  # config imports the trainer, which imports us

    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    clip = 0.0 if max_grad_norm is None else float(max_grad_norm)
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = clip
    elif float(ds["gradient_clipping"]) != clip:
        raise ConfigError(f"deepspeed config gradient_clipping={ds['gradient_clipping']} disagrees with "
                          f"optim.max_grad_norm={max_grad_norm}; set it to \"auto\"")
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = batch_size
    elif int(ds["train_micro_batch_size_per_gpu"]) != batch_size:
        raise ConfigError(f"deepspeed config train_micro_batch_size_per_gpu="
                          f"{ds['train_micro_batch_size_per_gpu']} disagrees with train.batch_size={batch_size}")
    steps = ds.get("gradient_accumulation_steps", "auto")
    steps = accelerator.gradient_accumulation_steps if steps == "auto" else int(steps)
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = batch_size * steps * accelerator.num_processes
    if ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none":
        # We pass a torch AdamW; DeepSpeed would otherwise insist on its compiled CPU Adam.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)


def gradient_accumulation_steps(accelerator: Any) -> int:
    """Micro-batches per optimiser step requested by accelerate or the DeepSpeed config."""
    steps = accelerator.gradient_accumulation_steps
    plugin = deepspeed_plugin(accelerator)
    if plugin is not None:
        ds_steps = plugin.deepspeed_config.get("gradient_accumulation_steps", "auto")
        if ds_steps != "auto":
            steps = int(ds_steps)
    return int(steps)


def warn_gradient_accumulation(accelerator: Any, batch_size: int) -> None:
    """Log a warning when plain gradient accumulation would shrink the negative pool."""
    steps = gradient_accumulation_steps(accelerator)
    if steps > 1:
        logger.warning(NEGATIVE_POOL_WARNING.format(steps=steps, batch=batch_size,
                                                    world=accelerator.num_processes))


@contextlib.contextmanager
def gathered_parameters(accelerator: Any, model: torch.nn.Module) -> Iterator[None]:
    """Under ZeRO-3, materialise the full parameters on every rank for the duration (to
    save or read them); a no-op otherwise. Must be entered on all ranks."""
    if zero_stage(accelerator) < 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


def mean_over_ranks(accelerator: Any, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over all processes (the logged loss)."""
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(value.detach().float().reshape(1), reduction="mean")[0]


def check_world_size(accelerator: Any) -> None:
    """Refuse a launch where the launcher started N processes but accelerate sees one each
    (e.g. ``accelerate launch`` on a CPU machine without ``ACCELERATE_USE_CPU=true``): each
    process would silently train alone on its shard with local negatives only."""
    from clicktower.launcher.config import ConfigError

    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and accelerator.num_processes != launched:
        raise ConfigError(f"WORLD_SIZE={launched} processes were launched but accelerate sees "
                          f"{accelerator.num_processes}: on CPU set ACCELERATE_USE_CPU=true")


def prepare_launch(accelerator: Any, batch_size: int, max_grad_norm: float | None) -> None:
    """Everything the entry point checks or fills before ``accelerator.prepare``: the world
    size, the DeepSpeed config's ``auto`` values, and the gradient-accumulation warning.

    Args:
        accelerator: the ``Accelerator``.
        batch_size: ``train.batch_size`` (pairs per process per step).
        max_grad_norm: ``optim.max_grad_norm``.
    """
    check_world_size(accelerator)
    configure_deepspeed(accelerator, batch_size, max_grad_norm)
    warn_gradient_accumulation(accelerator, batch_size)


def accelerator_kwargs() -> dict[str, Any]:
    """Extra ``Accelerator`` arguments for this host.

    DeepSpeed on a CPU-only host (DS_ACCELERATOR=cpu): accelerate finds no GPU backend for the
    process group, leaves it unset and then sees ONE process; gloo must be named. (With
    ACCELERATE_USE_CPU=true accelerate would instead drop DeepSpeed for plain DDP.)
    """
    from accelerate.utils import InitProcessGroupKwargs

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {}
