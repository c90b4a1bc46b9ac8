"""What a checkpoint save writes, split in two: capture the state, then write it.

``capture_state`` runs on every rank at the step boundary and returns a ``Snapshot``: the big
state (model and optimiser, or the DeepSpeed engine's ZeRO files) as objects to serialise;
the small files (LR schedulers, grad scaler, this rank's RNG states, registered objects) are
written at once through accelerate's own functions -- the same files, names and formats as
``accelerator.save_state``, so ``load_state``, ``zero_to_fp32`` and DeepSpeed's universal
conversion read them unchanged. ``Snapshot.write`` then serialises the big state, hashing every
byte on its way to the disk (``HashingFile``), and returns this rank's digests for the
``COMPLETE`` marker. With ``copy=True`` (``checkpoint.async_save``) every tensor is copied to
host memory during the capture, so that ``write`` can run in a background thread. Under
DeepSpeed, ``_CapturingEngine`` stands in for the engine's checkpoint writer during its
``save_checkpoint`` and records each ``save(state_dict, path)`` instead of writing it.
More: docs/checkpoints.md ("What a checkpoint holds").
"""
from __future__ import annotations

import copy as copy_module
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clicktower.launcher.engine.checkpoint.files import DS_MODEL_DIR, Digests, HashingFile, hash_files


@dataclass
class PendingFile:
    """One file of a snapshot, not yet written.

    Args:
        name: path relative to the checkpoint folder.
        obj: what to serialise (a state dict, host copies under ``copy=True``).
        fmt: ``torch`` (``torch.save``) or ``safetensors`` (model weights, as accelerate).
        zipfile: ``torch.save``'s zipfile format (DeepSpeed's engines choose; accelerate: yes).
    """

    name: str
    obj: Any
    fmt: str = "torch"
    zipfile: bool = True


@dataclass
class Snapshot:
    """A rank's captured checkpoint state: files to write, and small files already written
    by this rank that it hashes as its own.

    Args:
        folder: the checkpoint folder (the ``.tmp-`` one being filled).
        files: the big state, serialised by ``write``.
        written: names (relative) this rank wrote during the capture.
    """

    folder: Path
    files: list[PendingFile] = field(default_factory=list)
    written: list[str] = field(default_factory=list)

    def write(self) -> Digests:
        """Serialise every pending file into the folder (durably: fsync) and return this
        rank's digests: what it wrote now and during the capture. Safe to run in a thread."""
        digests: Digests = {}
        for pending in self.files:
            path = self.folder / pending.name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as fh:
                out = HashingFile(fh)
                _serialise(pending, out)
                fh.flush()
                os.fsync(fh.fileno())  # the marker may only vouch for bytes on the disk
            digests[pending.name] = out.record()
        digests.update(hash_files(self.folder, [n for n in self.written if n not in digests]))
        self.files = []  # drop the host copies as soon as they are on disk
        return digests


def _serialise(pending: PendingFile, out: HashingFile) -> None:
    import torch

    if pending.fmt == "safetensors":
        from accelerate.utils.other import clean_state_dict_for_safetensors
        from safetensors.torch import save

        # As accelerate's save(): tied weights (shared towers) stored once.
        out.write(save(clean_state_dict_for_safetensors(dict(pending.obj)), metadata={"format": "pt"}))
    else:
        torch.save(pending.obj, out, _use_new_zipfile_serialization=pending.zipfile)


def _host_tensor(tensor: Any, memo: dict[Any, Any]) -> Any:
    """``tensor`` with its storage copied to host memory; tensors sharing a storage (tied
    weights, views into DeepSpeed's flat buffers) share the copy, as they shared the
    original, so that what gets serialised is what a synchronous save serialises."""
    import torch

    tensor = tensor.detach()
    storage = tensor.untyped_storage() if tensor.layout == torch.strided else None
    if storage is None or storage.nbytes() == 0:  # sparse or empty: nothing to share
        return tensor.to("cpu", copy=True)
    key = (str(tensor.device), storage.data_ptr())
    if key not in memo:
        memo[key] = storage.clone() if tensor.device.type == "cpu" else storage.cpu()
    return torch.empty((0,), dtype=tensor.dtype).set_(memo[key], tensor.storage_offset(), tensor.size(),
                                                      tensor.stride())


def to_host(obj: Any, memo: dict[Any, Any] | None = None) -> Any:
    """A copy of ``obj`` that training cannot change: every tensor's storage copied to host
    memory (once per storage: shared storages stay shared), containers rebuilt, other leaves
    deep-copied where possible.

    Args:
        obj: a state dict or any nesting of dicts, lists, tuples, tensors and plain values.
        memo: storage copies made so far (internal).
    """
    import torch

    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        return _host_tensor(obj, memo)
    if isinstance(obj, dict):
        out = copy_module.copy(obj)  # keeps OrderedDict / defaultdict and their attributes
        for key, value in obj.items():
            out[key] = to_host(value, memo)
        return out
    if isinstance(obj, list):
        return [to_host(v, memo) for v in obj]
    if isinstance(obj, tuple):
        items = [to_host(v, memo) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return obj
    try:  # e.g. DeepSpeed's config objects: small, and mutable in principle
        return copy_module.deepcopy(obj)
    except Exception:  # noqa: BLE001 - not copyable (a lock, a handle): serialised as it is
        return obj


class _CapturingEngine:
    """Stands in for a DeepSpeed engine's checkpoint engine during ``save_checkpoint``:
    records what the engine would write, everything else goes to the real one.

    Args:
        real: the engine's checkpoint engine.
        snapshot: receives one ``PendingFile`` per ``save``.
        copy: copy the state to host memory (async saves).
    """

    def __init__(self, real: Any, snapshot: Snapshot, copy: bool) -> None:
        self.real, self.snapshot, self.copy = real, snapshot, copy

    def __getattr__(self, name: str) -> Any:  # load, cleanup, name ... of the real engine
        return getattr(self.real, name)

    def create(self, info: Any) -> None:
        pass

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        name = str(Path(path).resolve().relative_to(self.snapshot.folder.resolve()))
        zipfile = bool(getattr(self.real, "zipfile_serialization", True))
        self.snapshot.files.append(PendingFile(name, to_host(state_dict) if self.copy else state_dict,
                                               "torch", zipfile))

    def commit(self, info: Any) -> bool:
        return True

    def is_decoupled(self) -> bool:
        return False  # our writer commits; DeepSpeed must not wait for a decoupled one

    def preserves_storage_sharing(self) -> bool:
        # True makes DeepSpeed clone views before save (so a view does not drag its whole
        # storage into the file); the same answer as the real engine, so that the same
        # tensors reach the files as in a synchronous save.
        return bool(self.real.preserves_storage_sharing())


def _deepspeed_files(accelerator: Any, snapshot: Snapshot, copy: bool) -> None:
    """Every rank: the engine's ``save_checkpoint`` into ``pytorch_model/``, captured."""
    for i, engine in enumerate(accelerator._models):
        real = engine.checkpoint_engine
        engine.checkpoint_engine = _CapturingEngine(real, snapshot, copy)
        try:
            # accelerate's tag for model i (save_state's ckpt_id); collective (barriers inside).
            engine.save_checkpoint(str(snapshot.folder), DS_MODEL_DIR if i == 0 else f"{DS_MODEL_DIR}_{i}")
        finally:
            engine.checkpoint_engine = real


def _plain_files(accelerator: Any, snapshot: Snapshot, copy: bool, writer: bool) -> None:
    """Model weights (``model.safetensors``) and optimiser state (``optimizer.bin``) as
    ``save_state`` names them; only the writing process keeps them."""
    from accelerate.utils import OPTIMIZER_NAME, SAFE_WEIGHTS_NAME

    grab = to_host if copy else (lambda x: x)
    for i, model in enumerate(accelerator._models):
        state = accelerator.get_state_dict(model, unwrap=False)  # every rank, as save_state does
        if writer:
            name = SAFE_WEIGHTS_NAME if i == 0 else SAFE_WEIGHTS_NAME.replace(".", f"_{i}.")
            snapshot.files.append(PendingFile(name, grab(state), "safetensors"))
    if writer:
        for i, optimizer in enumerate(accelerator._optimizers):
            name = f"{OPTIMIZER_NAME}.bin" if i == 0 else f"{OPTIMIZER_NAME}_{i}.bin"
            snapshot.files.append(PendingFile(name, grab(optimizer.state_dict())))


def capture_state(accelerator: Any, folder: Path, copy: bool) -> Snapshot:
    """Capture everything ``accelerator.save_state`` saves (collective: every rank calls it).

    Args:
        accelerator: the training accelerator (model, optimiser prepared; the scheduler
            registered for checkpointing).
        folder: the checkpoint folder being filled (exists).
        copy: copy the big state to host memory, for a write in the background.

    Returns:
        This rank's snapshot; its ``write`` finishes the rank's part of the save.
    """
    from accelerate.checkpointing import save_accelerator_state, save_custom_state
    from accelerate.utils import RNG_STATE_NAME, DistributedType
    from accelerate.utils.deepspeed import DeepSpeedSchedulerWrapper

    snapshot = Snapshot(Path(folder))
    on_each_node = accelerator.project_configuration.save_on_each_node
    writer = accelerator.is_local_main_process if on_each_node else accelerator.is_main_process
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:
        _deepspeed_files(accelerator, snapshot, copy)
    else:
        _plain_files(accelerator, snapshot, copy, writer)
    schedulers = [s for s in accelerator._schedulers if not (deepspeed and isinstance(s, DeepSpeedSchedulerWrapper))]
    # The small files, at once, by accelerate itself: schedulers, samplers, scaler and this
    # rank's RNG states (models and optimisers are in the snapshot).
    save_accelerator_state(str(folder), [], [], schedulers, accelerator._dataloaders, accelerator.process_index,
                           accelerator.step, accelerator.scaler, save_on_each_node=on_each_node)
    for i, obj in enumerate(accelerator._custom_objects):
        save_custom_state(obj, str(folder), i, save_on_each_node=on_each_node)
    snapshot.written.append(f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl")
    return snapshot


def _own_elements(param: Any) -> Any:
    """The elements of ``param`` this rank holds, detached: the whole tensor, or under ZeRO-3
    the part of its partition (``ds_tensor``) that is the parameter's.

    A ZeRO-3 parameter is cut into ``world`` partitions of ``ceil(numel / world)`` elements,
    so the last ones end in padding, which DeepSpeed allocates with ``torch.empty`` and never
    writes: a rank whose partition of a 1-element parameter (the temperature) is all padding
    holds whatever bytes were there, sometimes a NaN. Counting them refused a healthy
    checkpoint (a flake of tests/test_resume_zero.py's ZeRO-3 run on rank 1)."""
    part = getattr(param, "ds_tensor", None)
    if part is None:
        return param.detach()
    part = part.detach().view(-1)
    size = int(getattr(part, "ds_numel", part.numel()))  # the partition's length, padding included
    start = size * int(param.ds_zero_partition_rank)
    return part[:max(0, min(size, int(param.ds_numel) - start))]


def nonfinite_parameters(accelerator: Any) -> list[str]:
    """Names of the prepared models' parameters that hold a NaN or an infinity on this rank
    (under ZeRO-3 the rank's own partition of each: the full tensor is nowhere). One host
    sync for all of them; the caller agrees over ranks.

    Args:
        accelerator: the training accelerator (models prepared).
    """
    import torch

    names, flags = [], []
    for model in accelerator._models:
        for name, param in model.named_parameters():
            tensor = _own_elements(param)
            if tensor.numel():
                names.append(name.removeprefix("module."))
                flags.append(torch.isfinite(tensor).all())
    if not flags:
        return []
    finite = torch.stack([flag.to(flags[0].device) for flag in flags]).tolist()  # offloaded partitions
    return [name for name, ok in zip(names, finite) if not ok]
