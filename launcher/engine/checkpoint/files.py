"""The on-disk checkpoint layout: names, checksums, the COMPLETE marker, finding the newest
usable checkpoint. Plain files only (no accelerate, no torch): what the checkpointer writes and
what resume, conversion and ``clicktower ckpt`` read. The layout is described in
docs/checkpoints.md.

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
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
COMPLETE = "COMPLETE"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")
DS_MODEL_DIR = "pytorch_model"  # accelerate's folder name for the DeepSpeed engine's files
COPIED_AS_IS = ("config.yaml", "custom_checkpoint_*.pkl", "random_states_*.pkl", "scheduler*.bin",
                "scaler.pt", "sampler*.bin")
Digests = dict[str, dict[str, object]]  # relative path -> {"sha256": hex, "bytes": size}


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
