"""The on-disk checkpoint layout: names, checksums, the COMPLETE marker, run lineages (which
checkpoints belong to which run, in commit order: ``Lineage``), finding the checkpoint to
resume from. Plain files only (no accelerate, no torch): what the checkpointer writes and what
resume, pruning, conversion and ``clicktower ckpt`` read. The layout is described in
docs/checkpoints.md ("Run lineages" for the lineage rules).

Checksums scale with the ranks: every rank hashes the files it wrote while writing them
(``HashingFile``), rank 0 gathers the digests into the ``COMPLETE`` marker and hashes only
what no rank claimed (its own few small files: config, trainer state, DeepSpeed's scripts).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clicktower.launcher.errors import ConfigError

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
COMPLETE = "COMPLETE"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
# The run's metric history (``OUTPUT_DIR/metrics.jsonl``): every checkpoint holds a copy up to
# its step, so that it travels with the checkpoint (``remote_dir``) and a resume gets it back.
METRICS_FILE = "metrics.jsonl"
STEP_DIR = re.compile(r"^step_(\d{8})$")
DS_MODEL_DIR = "pytorch_model"  # accelerate's folder name for the DeepSpeed engine's files
COPIED_AS_IS = ("config.yaml", METRICS_FILE, "custom_checkpoint_*.pkl", "random_states_*.pkl", "scheduler*.bin",
                "scaler.pt", "sampler*.bin")
Digests = dict[str, dict[str, object]]  # relative path -> {"sha256": hex, "bytes": size}
LEGACY_LINEAGE = "legacy"  # checkpoints written before lineages were recorded
# The commits resumes went back from, per lineage (``checkpoints/abandoned.json``, beside
# ``latest``, locally and remotely): ``{"<lineage id>": [[after, through], ...]}``, each range the
# commits numbered ``after < commit <= through`` that a resume from commit ``after`` left.
ABANDONED = "abandoned.json"
Abandoned = dict[str, list[tuple[int, int]]]


@dataclass(frozen=True)
class Lineage:
    """Where a checkpoint sits in its run's history (``trainer_state.json``'s ``lineage``).

    Args:
        id: the run lineage: minted at a fresh start, carried through every resume.
        commit: the lineage's commit counter at this checkpoint (unique within the lineage:
            a resume that goes back continues after the highest commit it finds).
        parent: the commit this one follows (the previous save, or the checkpoint resumed
            from); None for the first commit of a lineage.
        legacy: written by an earlier version (no record): commit = step, parent unknown.
    """

    id: str
    commit: int
    parent: int | None = None
    legacy: bool = False

    def record(self) -> dict[str, Any]:
        """The ``lineage`` entry of ``trainer_state.json``."""
        return {"id": self.id, "commit": self.commit, "parent": self.parent}


def parse_lineage(state: dict[str, Any]) -> Lineage:
    """The lineage of a checkpoint from its trainer state (legacy when it has none).

    Args:
        state: the parsed ``trainer_state.json``.
    """
    record = state.get("lineage")
    if not record:
        return Lineage(LEGACY_LINEAGE, int(state.get("step", 0)), None, legacy=True)
    parent = record.get("parent")
    return Lineage(str(record["id"]), int(record["commit"]), None if parent is None else int(parent))


def read_lineage(folder: Path) -> Lineage | None:
    """The lineage of checkpoint ``folder``, or None when its trainer state is unreadable.

    Args:
        folder: a checkpoint folder.
    """
    try:
        return parse_lineage(json.loads((folder / TRAINER_STATE).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lineage_chain(entries: dict[str, Lineage], head: str) -> list[str]:
    """The checkpoints of ``head``'s lineage that lead to it, newest first: each one's parent
    next. Commits a resume went back from (abandoned by it) are not in the chain.

    Args:
        entries: checkpoint name -> lineage (any lineages; others are left out).
        head: the newest checkpoint of the chain (a key of ``entries``).
    """
    top = entries[head]
    same = sorted((n for n, lin in entries.items() if lin.id == top.id and lin.commit <= top.commit),
                  key=lambda n: entries[n].commit, reverse=True)
    chain, bound = [], top.commit
    for name in same:
        lin = entries[name]
        if lin.commit > bound:  # after the parent of a later commit: abandoned by a resume
            continue
        chain.append(name)
        # A legacy checkpoint's parent is unknown: the next older one, as steps ordered them.
        bound = lin.parent if lin.parent is not None else (lin.commit - 1 if lin.legacy else -1)
    return chain


def prune_plan(entries: dict[str, Lineage], head: str, keep_last: int, where: str) -> list[str]:
    """The checkpoints to delete after ``head`` was committed: those of its lineage beyond the
    newest ``keep_last`` of its chain (the commits a resume went back from among them, named in
    a warning). Other lineages' checkpoints are never in it.

    Args:
        entries: checkpoint name -> lineage.
        head: the checkpoint just committed.
        keep_last: ``checkpoint.keep_last``.
        where: the checkpoints folder (for the warning).
    """
    chain = lineage_chain(entries, head)
    keep = set(chain[:keep_last])
    doomed = [name for name, lin in entries.items() if lin.id == entries[head].id and name not in keep]
    for name in doomed:
        if name not in chain:
            logger.warning("deleting checkpoint %s/%s: abandoned by a resume from an earlier commit of its run",
                           where, name)
    return doomed


def lineage_head(entries: dict[str, Lineage], latest: str | None, where: str) -> str | None:
    """The checkpoint a resume continues from: the one ``latest`` names, else the newest
    commit of the only lineage there; None when there is none.

    Args:
        entries: checkpoint name -> lineage, of the complete-looking checkpoints.
        latest: the name in the ``latest`` pointer, if any.
        where: the checkpoints folder (for the message).

    Raises:
        ConfigError: several lineages and no pointer to choose among them.
    """
    if latest in entries:
        return latest
    ids = sorted({lin.id for lin in entries.values()})
    if not ids:
        return None
    if len(ids) > 1:
        raise ConfigError(f"train.resume=auto: {where} holds checkpoints of {len(ids)} runs ({', '.join(ids)}) and "
                          f"no {LATEST} pointer names one of them; pick one with train.resume=CHECKPOINT_DIR")
    return max(entries, key=lambda n: entries[n].commit)


def parse_abandoned(text: str) -> Abandoned:
    """The ranges of an ``abandoned.json`` text (see ``ABANDONED``); a file that does not
    parse is named and counts as empty (it can only make ``auto`` newer, never older).

    Args:
        text: the file's content.
    """
    try:
        return {str(k): [(int(a), int(b)) for a, b in v] for k, v in json.loads(text).items()}
    except (ValueError, TypeError, AttributeError) as exc:
        logger.warning("ignoring an unreadable %s (%s)", ABANDONED, exc)
        return {}


def read_abandoned(root: Path) -> Abandoned:
    """The abandoned commits recorded in ``root`` (a ``checkpoints/`` folder); {} when none.

    Args:
        root: a ``checkpoints/`` folder.
    """
    try:
        return parse_abandoned((root / ABANDONED).read_text())
    except OSError:
        return {}


def with_abandoned(record: Abandoned, lineage_id: str, after: int, through: int) -> Abandoned:
    """``record`` plus the range ``after < commit <= through`` of ``lineage_id`` (a resume
    from commit ``after`` while commits up to ``through`` exist).

    Args:
        record: the ranges recorded so far.
        lineage_id: the run lineage.
        after: the commit resumed from.
        through: the highest commit of the lineage found locally or remotely.
    """
    out = {k: list(v) for k, v in record.items()}
    if (after, through) not in out.get(lineage_id, []):
        out.setdefault(lineage_id, []).append((after, through))
    return out


def merge_abandoned(first: Abandoned, second: Abandoned) -> Abandoned:
    """Both records' ranges (the local and the remote one).

    Args:
        first: one record.
        second: another.
    """
    out = first
    for lineage_id, ranges in second.items():
        for after, through in ranges:
            out = with_abandoned(out, lineage_id, after, through)
    return out


def is_abandoned(lineage: Lineage, abandoned: Abandoned) -> bool:
    """Whether a resume went back from this commit (it is in a recorded range).

    Args:
        lineage: a checkpoint's lineage.
        abandoned: the recorded ranges (``read_abandoned``; local and remote merged).
    """
    return any(after < lineage.commit <= through for after, through in abandoned.get(lineage.id, ()))


def lineage_tip(entries: dict[str, Lineage], named: str, abandoned: Abandoned) -> str:
    """The checkpoint ``auto`` continues from: the newest commit of ``named``'s lineage that
    no resume went back from. ``named`` (what ``latest`` holds) only picks the lineage: a
    newer commit is a save whose pointer write was cut off (a kill between the rename, or
    the upload's marker, and the pointer), and the commits a resume went back from are
    recorded (``ABANDONED``) when it starts, before its first save.

    Args:
        entries: checkpoint name -> lineage, of the complete-looking checkpoints.
        named: a key of ``entries`` (from ``lineage_head``).
        abandoned: the recorded ranges.
    """
    lineage = entries[named].id
    live = [n for n, lin in entries.items() if lin.id == lineage and not is_abandoned(lin, abandoned)]
    return max(live, key=lambda n: entries[n].commit) if live else named


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class HashingFile:
    """A write-only file that hashes what passes through it: a rank's digest of the bytes it
    wrote, without reading the file back (``torch.save`` and ``write`` take it as a file).

    Args:
        fh: the open binary file written to.
    """

    def __init__(self, fh) -> None:
        self.fh, self.digest, self.size = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()

    def record(self) -> dict[str, object]:
        """The marker entry of what was written."""
        return {"sha256": self.digest.hexdigest(), "bytes": self.size}


def hash_files(folder: Path, names: list[str]) -> Digests:
    """Marker entries of files already on disk.

    Args:
        folder: the checkpoint folder.
        names: paths relative to ``folder``.
    """
    return {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
            for name in names}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_complete_marker(folder: Path, step: int, digests: Digests | None = None) -> None:
    """Write the ``COMPLETE`` marker of a checkpoint folder (last: it makes the folder usable).

    Args:
        folder: the checkpoint folder, every file written.
        step: its step.
        digests: entries the ranks computed while writing (gathered); every other file of
            the folder is hashed here. None: hash every file here.

    Raises:
        FileNotFoundError: a file a rank reported is not in the folder (a rank wrote
            elsewhere, or the folders are not on one shared file system).
    """
    digests = dict(digests or {})
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE}
    missing = sorted(set(digests) - on_disk)
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} file(s) written by the ranks are not there, "
                                f"e.g. {missing[0]} (is the output folder on a file system every rank shares?)")
    digests.update(hash_files(folder, sorted(on_disk - set(digests))))
    files = {name: digests[name] for name in sorted(digests)}
    write_atomic(folder / COMPLETE, json.dumps({"step": step, "files": files}, indent=1) + "\n")


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


def read_latest(root: Path) -> str | None:
    """The checkpoint name the ``latest`` pointer of ``root`` holds, if any.

    Args:
        root: a ``checkpoints/`` folder.
    """
    try:
        return (root / LATEST).read_text().strip() or None
    except OSError:
        return None


def local_lineages(output_dir: str | Path) -> dict[str, Lineage]:
    """Lineage of every complete-looking checkpoint of a run folder (``COMPLETE`` there and a
    readable trainer state), by checkpoint name, oldest step first.

    Args:
        output_dir: the run's output folder.
    """
    found = ((folder.name, read_lineage(folder)) for folder in list_checkpoints(output_dir)
             if (folder / COMPLETE).is_file())
    return {name: lineage for name, lineage in found if lineage is not None}


def find_resume_checkpoint(output_dir: str | Path, resume: str, verify_checksums: bool = True) -> Path | None:
    """Resolve ``train.resume``: ``none`` / ``new`` (start over), ``auto`` or a path.

    ``auto`` continues the run lineage the ``latest`` pointer names: its newest commit that
    no resume went back from (``lineage_tip``), else the usable commits that led to it.
    Checkpoints of other lineages (another run started in this folder) are named, never taken.

    Args:
        output_dir: the run's output folder.
        resume: ``none``, ``new``, ``auto`` or a checkpoint folder.
        verify_checksums: recompute checksums while checking.

    Returns:
        The checkpoint folder, or None to start from scratch.

    Raises:
        FileNotFoundError: an explicit path that is not a usable checkpoint.
        ConfigError: (``auto``) several lineages and no ``latest`` pointer naming one.
    """
    if resume in ("none", "new"):
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
    entries = local_lineages(output_dir)
    for folder in list_checkpoints(output_dir):
        if folder.name not in entries:
            logger.warning("skipping checkpoint %s: %s", folder, check_checkpoint(folder, False) or "unreadable state")
    head = lineage_head(entries, read_latest(root), str(root))
    if head is None:
        return None
    head = lineage_tip(entries, head, read_abandoned(root))
    others = [n for n in entries if entries[n].id != entries[head].id]  # oldest step first
    if others:
        logger.warning("not resuming %d checkpoint(s) of another run in %s (newest: %s); train.resume=%s "
                       "resumes it", len(others), root, others[-1], root / others[-1])
    for name in lineage_chain(entries, head):
        problem = check_checkpoint(root / name, verify_checksums)
        if problem is None:
            return root / name
        logger.warning("skipping checkpoint %s: %s", root / name, problem)
    return None
