"""Launcher-side glue for multi-process training: the ``Accelerator``'s arguments, the
precision and numerics the launch resolves to, DeepSpeed config filling, warnings, ZeRO-3
parameter gathering and rank reductions. All torch.distributed / DeepSpeed awareness of the
training loop lives here and in ``step.py``; models and losses never read the rank or the
environment.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Iterator

import torch

from clicktower.launcher.errors import ConfigError

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


def accelerator_kwargs(collective_timeout_s: float | None = None,
                       mixed_precision: str | None = None) -> dict[str, Any]:
    """``Accelerator`` arguments for this host and config: the precision when the config sets
    one, the process-group backend where accelerate cannot pick it, and the collective timeout.

    DeepSpeed on a CPU-only host (DS_ACCELERATOR=cpu): accelerate finds no GPU backend for the
    process group, leaves it unset and then sees ONE process; gloo must be named. (With
    ACCELERATE_USE_CPU=true accelerate would instead drop DeepSpeed for plain DDP.) DeepSpeed's
    shared-memory collective extension is skipped there (see ``skip_deepspeed_shm_comm``).

    Args:
        collective_timeout_s: ``train.collective_timeout_s``: how long a collective waits for a
            lost peer (dead host, cut link) before failing; reaches
            ``torch.distributed.init_process_group`` (DDP) and ``deepspeed.init_distributed``.
            None keeps the libraries' defaults (30 minutes for gloo).
        mixed_precision: ``train.mixed_precision``. None passes nothing, so accelerate takes
            the launcher's (``ACCELERATE_MIXED_PRECISION``, set by ``accelerate launch`` from
            its config or ``--mixed_precision``); a value overrides the launcher's.

    Raises:
        ConfigError: ``fp16`` on a host without CUDA (its gradient scaler needs a GPU).
    """
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    kwargs: dict[str, Any] = {}
    if mixed_precision is not None:
        if mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU (accelerate's fp16 "
                              "gradient scaler); use bf16 or \"no\" on this host")
        # Only when set: Accelerator(mixed_precision=...) overrides the launcher's value.
        kwargs["mixed_precision"] = mixed_precision
    handler: dict[str, Any] = {}
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and not torch.cuda.is_available():
        skip_deepspeed_shm_comm()
    if deepspeed and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handler["backend"] = "gloo"
    if collective_timeout_s is not None:
        handler["timeout"] = timedelta(seconds=collective_timeout_s)
        if "timeout" not in InitProcessGroupKwargs(**handler).to_kwargs():
            # accelerate passes on only what differs from ITS default (600 s, the nccl one);
            # torch's gloo and DeepSpeed's own defaults are 30 minutes, so 600 s would be lost.
            handler["timeout"] += timedelta(milliseconds=1)
    if handler:
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(**handler)]
    return kwargs


def skip_deepspeed_shm_comm() -> None:
    """Stop DeepSpeed from JIT-compiling its CPU shared-memory collectives
    (``deepspeed_shm_comm``) when it sets up its process group.

    The extension serves only ``inference_all_reduce`` (tensor-parallel inference), never
    ZeRO training, yet DeepSpeed builds it at every ``init_distributed`` on a CPU-only host:
    ~90 s of compiling on a 2-core machine for the first launch, and again whenever the
    cached build is invalidated -- torch keys its extension cache (``~/.cache/torch_extensions``)
    by Python version only, so two virtualenvs, or two ``ninja`` versions on the PATH, rebuild
    each other's copy. Marking the op incompatible makes DeepSpeed skip it (its probe result
    is a module-level dict that is read, not recomputed). No-op where DeepSpeed lacks it.
    """
    try:
        import deepspeed.ops
    except ImportError:
        return
    try:
        compatible = deepspeed.ops.__compatible_ops__
    except AttributeError:
        return
    if isinstance(compatible, dict) and "deepspeed_shm_comm" in compatible:
        compatible["deepspeed_shm_comm"] = False


def resolve_numerics(accelerator: Any, train: Any) -> Any:
    """``train`` with ``mixed_precision`` and ``deterministic`` resolved: what this run trains
    with, as ``config.yaml`` and every checkpoint record it.

    mixed_precision: the precision accelerate settled on (the config's value, else the
    launcher's, else ``no``; under DeepSpeed what the DeepSpeed config enables). deterministic:
    the config's value, else true on a CPU and false on any accelerator.

    Args:
        accelerator: the ``Accelerator`` (built with ``accelerator_kwargs``).
        train: the ``TrainConfig`` as configured (None: not set).

    Raises:
        ConfigError: the config asks for a precision accelerate does not train in (a DeepSpeed
            config file whose ``fp16``/``bf16`` ``enabled`` contradicts it).
    """
    resolved = str(accelerator.mixed_precision)
    requested = train.mixed_precision
    if requested is not None and resolved != requested:
        # Only DeepSpeed overrides what was passed: its config file's fp16/bf16 "enabled" decide.
        raise ConfigError(f"train.mixed_precision={requested} but accelerate trains in {resolved}: set "
                          f"\"enabled\" of {requested} to \"auto\" in the DeepSpeed config file")
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if requested is None and launcher not in (None, "no", resolved):
        logger.warning(f"the launcher asked for mixed_precision={launcher} but accelerate trains in {resolved} "
                       f"(under DeepSpeed the DeepSpeed config file's fp16/bf16 settings decide)")
    deterministic = train.deterministic
    if deterministic is None:
        deterministic = accelerator.device.type == "cpu"
    return dataclasses.replace(train, mixed_precision=resolved, deterministic=deterministic)


def set_numerics(device: torch.device, deterministic: bool) -> None:
    """Process-wide numerics for training on ``device``: deterministic kernels, or TF32.

    Deterministic: ``torch.use_deterministic_algorithms`` (warn-only where an op has no
    deterministic kernel), no TF32 and, on CUDA, cuBLAS's deterministic workspace. Otherwise
    on CUDA, TF32 matmuls and convolutions (fp32 matmuls at tensor-core speed, ~1e-3 relative
    error; bf16/fp16 autocast matmuls are unaffected).

    Args:
        device: the training device (``accelerator.device``).
        deterministic: the resolved ``train.deterministic``.
    """
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if deterministic:
        # Deterministic mode also fills every torch.empty with NaN, a debugging aid. DeepSpeed
        # ZeRO-1/2 allocate their reduce bucket (reduce_bucket_size elements: 2 GiB fp32 at
        # DeepSpeed's default) with torch.empty at EVERY step: the fill made a tiny-BERT CPU
        # step ~20x slower than DDP's, mostly page-fault time. Valid code never reads memory it
        # did not write, so results stay deterministic without it (PyTorch's documentation).
        torch.utils.deterministic.fill_uninitialized_memory = False
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic
        if deterministic:
            # Read when cuBLAS creates its handle (the first matmul, after this).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


class PeerLost(RuntimeError):
    """A collective failed: another training process died, its host went down, or the
    network between the hosts was cut. The run cannot continue; restart it (all hosts) and
    it resumes from the newest checkpoint (``train.resume=auto``)."""


def _is_collective_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the communication backend rather than from our code."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    # gloo raises plain RuntimeErrors; their text starts with the source file of the transport.
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("/gloo/" in text or "NCCL" in text or "ProcessGroup" in text)


def _cause(exc: BaseException) -> str:
    """The backend's first line without its source-file prefix and its jokes."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]  # "[.../gloo/transport/tcp/pair.cc:537] Read error ..."
    return line.split(". This is typically caused")[0].rstrip(".")


@contextlib.contextmanager
def peer_loss_errors(step: Any, timeout_s: float, checkpoint: Any) -> Iterator[None]:
    """Turn a failed collective into :class:`PeerLost` naming the step, the cause and the
    checkpoint to resume from (instead of a backend traceback that blames "bugs in the
    application").

    Args:
        step: callable returning the step in progress (the last finished one).
        timeout_s: ``train.collective_timeout_s``, quoted in the message.
        checkpoint: callable returning the newest checkpoint this run saved, or None.
    """
    try:
        yield
    except Exception as exc:
        if not _is_collective_error(exc):
            raise
        # torchrun's GROUP_RANK is the node (machine) rank.
        where = f"rank {os.environ.get('RANK', '0')} (node {os.environ.get('GROUP_RANK', '0')})"
        saved = checkpoint()
        raise PeerLost(
            f"{where}: lost contact with the other training processes after step {step()} "
            f"({_cause(exc)}): a process or host died, or the network between hosts was cut "
            f"(train.collective_timeout_s={timeout_s:g}); restart the job on all hosts to resume "
            f"from {saved or 'the newest checkpoint'} (train.resume=auto)") from None


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``torch.distributed.broadcast_object_list``): what the
    data loader calls so that one rank checks the shard files and the others reuse its answer.

    Args:
        obj: this rank's object (only rank 0's matters).
    """
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
