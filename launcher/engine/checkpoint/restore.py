"""Resuming: which checkpoint (``resolve_resume``) and restoring it on this topology
(``load_checkpoint``). Used by ``Checkpointer.resume`` / ``Checkpointer.load``; the layout and
the conversions are described in docs/checkpoints.md.

Verification (checksums, the remote listing, downloads) runs once per node, on the node's
first process; the answer reaches every rank through one all-gather.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from clicktower.data.storage import describe_failure
from clicktower.launcher.engine.checkpoint.files import (CHECKPOINT_DIR, COMPLETE, DS_MODEL_DIR, TRAINER_STATE,
                                                         find_resume_checkpoint, lineage_chain, lineage_head,
                                                         is_abandoned, lineage_tip, list_checkpoints, merge_abandoned,
                                                         read_abandoned, read_lineage)
from clicktower.launcher.engine.checkpoint.remote import RemoteCheckpoints
from clicktower.launcher.engine.checkpoint.convert import convert_to_ddp, convert_to_universal
from clicktower.launcher.engine.checkpoint.state import nonfinite_parameters
from clicktower.launcher.engine.distributed import zero_stage
from clicktower.launcher.errors import ConfigError

logger = logging.getLogger("clicktower.launcher.engine.checkpoint")


def all_gather_objects(obj: Any, accelerator: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (collective; no communication on one process).

    Args:
        obj: a picklable object.
        accelerator: the training accelerator.
    """
    import torch.distributed as dist

    if accelerator.num_processes == 1 or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(out, obj)
    return out


def topology(accelerator: Any) -> dict[str, int]:
    """The saving/loading topology recorded in ``trainer_state.json``.

    Args:
        accelerator: the training accelerator.
    """
    return {"world_size": int(accelerator.num_processes), "zero_stage": zero_stage(accelerator)}


def resolve_resume(accelerator: Any, root: Path, setting: str, verify_checksums: bool,
                   remote: RemoteCheckpoints | None) -> Path | None:
    """The checkpoint to resume from, found and verified by each node's first process and
    shared with the node's other processes (collective: one all-gather).

    Args:
        accelerator: the training accelerator.
        root: the run's ``checkpoints/`` folder.
        setting: ``train.resume``: ``auto``, ``none``, ``new`` or a checkpoint folder.
        verify_checksums: recompute every file's sha256 while checking.
        remote: the run's remote checkpoints (``auto`` looks there too), or None.

    Raises:
        FileNotFoundError: ``setting`` names a folder that is not a usable checkpoint.
        ConfigError: the nodes found different checkpoints (no shared file system);
            ``none`` where checkpoints of an earlier run are; ``auto`` among several run
            lineages with no ``latest`` pointer naming one.
    """
    answer = None
    if accelerator.is_local_main_process:
        try:
            found = _find(root, setting, verify_checksums, remote)
            answer = ("ok", str(found) if found is not None else None)
        except FileNotFoundError as exc:
            answer = ("missing", str(exc))
        except ConfigError as exc:  # raised on every rank below, not only here
            answer = ("config", str(exc))
    answers = all_gather_objects(answer, accelerator)
    leaders = [a for a in answers if a is not None]
    for kind, text in leaders:
        if kind == "missing":
            raise FileNotFoundError(text)
        if kind == "config":
            raise ConfigError(text)
    names = sorted({Path(text).name if text else "none" for _, text in leaders})
    if len(names) > 1:
        raise ConfigError(f"train.resume={setting}: the nodes found different checkpoints ({', '.join(names)}); "
                          "the output folder must be on a file system every node shares")
    # Launchers number a node's processes consecutively: its first has local index 0.
    mine = answers[accelerator.process_index - accelerator.local_process_index][1]
    return Path(mine) if mine else None


def _refuse_earlier_run(root: Path, remote: RemoteCheckpoints | None) -> None:
    """``train.resume=none`` where checkpoints are: starting over there would mix two runs'
    checkpoints in one folder (and, before lineages, prune the new run's), so it is refused."""
    local = [p.name for p in list_checkpoints(root.parent) if (p / COMPLETE).is_file()]
    where, names = root, local
    if not local and remote is not None:
        where, names = remote.path(CHECKPOINT_DIR), remote.complete_steps()
    if names:
        raise ConfigError(f"train.resume=none: {where} holds checkpoints of an earlier run (newest: {names[-1]}); "
                          "continue it with train.resume=auto, start a new run beside them with train.resume=new, "
                          "or use another train.output_dir")


def _find(root: Path, setting: str, verify_checksums: bool, remote: RemoteCheckpoints | None) -> Path | None:
    """Local resolution, then (``auto`` with a remote) a newer remote checkpoint of the same
    run lineage, downloaded and verified; a broken one is named and passed over."""
    if setting == "none":
        _refuse_earlier_run(root, remote)
    local = find_resume_checkpoint(root.parent, setting, verify_checksums)
    if setting != "auto" or remote is None:
        return local
    entries = remote.lineages()
    # The pointer picks the lineage; a newer commit of it is an upload whose pointer write was
    # cut off (a node killed between the marker and ``latest``), unless a resume went back
    # from it: those are recorded (here or remotely) when the resume starts, before its
    # first save, so that they are never taken again.
    abandoned = merge_abandoned(read_abandoned(root), remote.abandoned())
    if local is not None:
        mine = read_lineage(local)
        newer = [n for n, lin in entries.items()
                 if lin.id == mine.id and lin.commit > mine.commit and not is_abandoned(lin, abandoned)]
        if not newer:
            return local
        head = max(newer, key=lambda n: entries[n].commit)
    else:
        named = lineage_head(entries, remote.latest(), remote.path(CHECKPOINT_DIR))
        if named is None:
            return None
        head = lineage_tip(entries, named, abandoned)
    for name in lineage_chain(entries, head):
        if local is not None and entries[name].commit <= mine.commit:
            break  # the local one is as new
        try:
            root.mkdir(parents=True, exist_ok=True)
            folder = remote.download(name, root, verify_checksums)
        except Exception as exc:  # noqa: BLE001 - a broken remote copy: try the next one
            logger.warning("skipping remote checkpoint %s: %s", remote.path(CHECKPOINT_DIR, name),
                           describe_failure(exc))
            continue
        print(f"downloaded {remote.path(CHECKPOINT_DIR, name)} to {folder}", flush=True)
        return folder
    return local


def load_checkpoint(accelerator: Any, folder: Path, root: Path) -> dict[str, Any]:
    """Restore everything a save wrote; returns the trainer state (collective).

    A DeepSpeed checkpoint resumed without DeepSpeed is converted first (every rank converts
    into its own temporary folder: no shared file system or collective needed); one resumed
    under ZeRO on another number of processes goes through DeepSpeed's universal format
    (``_load_universal``).

    Args:
        accelerator: the training accelerator (objects prepared and registered).
        folder: a complete checkpoint folder.
        root: the run's ``checkpoints/`` folder (where a universal conversion goes).

    Raises:
        ConfigError: a checkpoint that this topology cannot load, or whose weights hold a NaN
            or an infinity (the message says why and names the folder).
    """
    acc = accelerator
    state = json.loads((folder / TRAINER_STATE).read_text())
    state.pop("remote", None)  # the uploader's counters: informative only
    state.pop("lineage", None)  # the checkpointer's own record (``Checkpointer.resume`` reads it)
    # The saving topology is the checkpointer's own record, not part of the trainer state.
    saved = state.pop("topology", None) or {"world_size": None, "zero_stage": 0}
    now = topology(acc)
    saved_stage, saved_world = int(saved.get("zero_stage") or 0), saved.get("world_size")
    is_ds_checkpoint = (folder / DS_MODEL_DIR).is_dir()
    is_universal = (folder / DS_MODEL_DIR / "zero").is_dir()  # converted offline (ckpt convert)
    if now["zero_stage"] == 0 and is_universal:
        raise ConfigError(f"{folder}: a universal checkpoint resumes under DeepSpeed ZeRO only; convert the "
                          "original with clicktower ckpt convert --to ddp to resume without DeepSpeed")
    if now["zero_stage"] == 0 and is_ds_checkpoint:
        if acc.is_main_process:  # checkpoints older than the topology record say "?"
            logger.warning("%s: DeepSpeed ZeRO-%s checkpoint of %s processes, resumed without DeepSpeed on %s: "
                           "converting (weights, optimiser moments, schedule, data position kept)",
                           folder, saved_stage or "?", saved_world or "?", now["world_size"])
        with tempfile.TemporaryDirectory(prefix="clicktower-ckpt-") as tmp:
            converted = Path(tmp) / folder.name
            convert_to_ddp(folder, converted)
            acc.load_state(str(converted))
    elif now["zero_stage"] > 0 and not is_ds_checkpoint:
        raise ConfigError(f"{folder}: a non-DeepSpeed checkpoint cannot be resumed under DeepSpeed "
                          "ZeRO; resume it without DeepSpeed (DDP or one process)")
    elif now["zero_stage"] > 0 and saved_stage != now["zero_stage"]:
        raise ConfigError(
            f"{folder}: saved by ZeRO-{saved_stage}, resumed by ZeRO-{now['zero_stage']}: resume it with "
            f"ZeRO-{saved_stage} (on any number of processes) or without DeepSpeed (converted automatically)")
    elif now["zero_stage"] > 0 and (is_universal or saved_world not in (None, now["world_size"])):
        _load_universal(acc, folder, root, saved_world)
    else:
        acc.load_state(str(folder))
    if saved_world not in (None, now["world_size"]) and acc.is_main_process:
        # accelerate restores random_states_{rank}.pkl where it exists and skips it otherwise.
        logger.warning("%s: saved by %s processes, resumed on %s: weights, optimiser, schedule and data "
                       "position are restored; per-rank RNG streams only for ranks below %s",
                       folder, saved_world, now["world_size"], min(saved_world, now["world_size"]))
    _refuse_nonfinite(acc, folder)
    return state


def nonfinite_weights(accelerator: Any) -> list[str]:
    """The model parameters holding a NaN or an infinity on any rank, sorted; the same list on
    every rank (collective: one all-gather; under ZeRO-3 each rank checks its own partition).

    Args:
        accelerator: the training accelerator (models prepared).
    """
    per_rank = all_gather_objects(nonfinite_parameters(accelerator), accelerator)
    return sorted({name for names in per_rank for name in names})


def _refuse_nonfinite(acc: Any, folder: Path) -> None:
    """Refuse, on every rank, a checkpoint whose loaded weights are not finite: older versions
    saved the state after a NaN update, and resuming it trained on NaN for ever."""
    names = nonfinite_weights(acc)
    if names:
        raise ConfigError(f"{folder}: {len(names)} model tensor(s) hold NaN or inf (e.g. {names[0]}), saved after "
                          "a step that went non-finite; delete that folder to resume from the checkpoint before it "
                          "(train.resume=auto) or name an older one (train.resume=PATH)")


class _ElsewherePartition:
    """Stands in, during a universal load, for a ZeRO-1/2 parameter group of which this rank
    holds no parameter (the whole group lies in other ranks' partitions: e.g. the one-scalar
    temperature group on every rank but the first). DeepSpeed 0.19's
    ``load_hp_checkpoint_state_from_checkpoint_dir`` reads ``steps[0]`` of the parameters it
    loaded for each group and fails on such a rank with an IndexError; with this stand-in the
    group loads nothing (step None: left as it is) and takes its hyper-parameters (lr) as
    usual."""

    class _Mapping:
        @staticmethod
        def get_optim_state_keys() -> list[str]:
            return []

    _hp_mapping = _Mapping()

    def load_hp_checkpoint_state(self, *args: Any, **kwargs: Any) -> None:
        return None


@contextlib.contextmanager
def _universal_loading(accelerator: Any) -> Iterator[None]:
    """Make the DeepSpeed engines load universal checkpoints (their ``checkpoint.
    load_universal`` setting) for the duration, with ``_ElsewherePartition`` in the ZeRO-1/2
    groups this rank has no parameter of."""
    engines = list(accelerator._models)
    before = [e._config.load_universal_checkpoint for e in engines]
    swapped = []
    for engine in engines:
        engine._config.load_universal_checkpoint = True
        groups = getattr(engine.optimizer, "bit16_groups", None)  # ZeRO-1/2 only
        for i, group in enumerate(groups or []):
            if not any(getattr(p, "_hp_mapping", None) is not None for p in group):
                stand_in = _ElsewherePartition()
                swapped.append((engine.optimizer, i, group, stand_in))
                groups[i] = [stand_in]
                engine.optimizer.param_names[stand_in] = ""  # looked up before the (no-op) load
    try:
        yield
    finally:
        for optimizer, i, group, stand_in in swapped:
            optimizer.bit16_groups[i] = group
            optimizer.param_names.pop(stand_in, None)
        for engine, value in zip(engines, before):
            engine._config.load_universal_checkpoint = value


def _repair_zero3_universal_load(accelerator: Any, universal: Path) -> None:
    """Undo two things DeepSpeed 0.19's ZeRO-3 universal loader gets wrong (ZeRO-1/2 load
    both right):

    * it gives every sub-group's optimiser state the SAME ``step`` tensor, which AdamW then
      increments in place once per sub-group at every step (3 groups: +3 a step, so wrong
      bias corrections from the first step on): each gets its own copy;
    * it copies the first parameter group's settings into every group, which would put
      weight decay on biases, LayerNorm weights and the temperature (clicktower's second and
      third groups): each group gets its own saved settings back.
    """
    from clicktower.launcher.engine.checkpoint.convert import torch_load

    for engine in accelerator._models:
        optimizer = engine.optimizer
        if not hasattr(optimizer, "fp32_partitioned_groups_flat"):  # not ZeRO-3
            continue
        for flat in optimizer.fp32_partitioned_groups_flat:
            state = optimizer.optimizer.state.get(flat, {})
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        saved = torch_load(universal / DS_MODEL_DIR / "zero" / "optimizer_state.pt")["param_groups"]
        live = optimizer.optimizer.param_groups
        if len(saved) != len(live):
            raise ConfigError(f"{universal}: {len(saved)} optimiser groups saved, {len(live)} built")
        for group, settings in zip(live, saved):
            group.update({k: v for k, v in settings.items() if k != "params"})


def _load_universal(acc: Any, folder: Path, root: Path, saved_world: int | None) -> None:
    """A ZeRO checkpoint of ``saved_world`` processes into this run's ZeRO engine on another
    number: rank 0 converts it to DeepSpeed's universal format next to the checkpoints
    (``.universal-step_X``; every rank reads it, so a shared file system, as for saving),
    every rank loads its new partition from it, rank 0 removes it.

    The conversion reads every shard once, on rank 0, while the other ranks wait at a barrier
    bounded by ``train.collective_timeout_s``; for a model too big for that, convert once
    offline (``clicktower ckpt convert --to universal``) and resume from the output folder.
    """
    converted = not (folder / DS_MODEL_DIR / "zero").is_dir()
    universal = root / f".universal-{folder.name}" if converted else folder
    if acc.is_main_process and converted:
        logger.warning("%s: DeepSpeed ZeRO checkpoint of %s processes, resumed under ZeRO on %s: converting "
                       "to a universal checkpoint (%s)", folder, saved_world or "?", acc.num_processes, universal)
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(universal, ignore_errors=True)
        convert_to_universal(folder, universal)
    acc.wait_for_everyone()
    with _universal_loading(acc):
        acc.load_state(str(universal))
    _repair_zero3_universal_load(acc, universal)
    acc.wait_for_everyone()
    if acc.is_main_process and converted:
        shutil.rmtree(universal, ignore_errors=True)
