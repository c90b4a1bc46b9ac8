"""Saving and resuming: ``Checkpointer`` (with its ``CheckpointConfig``), the one component that
writes and restores everything that defines a step.

A save: every rank captures its state (``state.capture_state``), writes its files and hashes
them as it writes; rank 0 gathers the digests into ``COMPLETE``, renames the ``.tmp-`` folder
into place and writes ``latest`` last, so a kill at any moment leaves the previous checkpoint
set or a complete new one. With ``checkpoint.async_save`` the writing runs in a background
thread and a later step boundary commits it (at most one save in flight). With
``checkpoint.remote_dir`` rank 0 uploads each committed checkpoint (``remote``). Resuming
(``restore``) takes the newest complete checkpoint, local or remote, and converts a ZeRO one
for another topology; the run's ``metrics.jsonl`` travels inside each checkpoint. Layout,
guarantees and limits: docs/checkpoints.md.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clicktower.data.storage import describe_failure
from clicktower.launcher.engine.checkpoint.files import (ABANDONED, CHECKPOINT_DIR, LATEST, METRICS_FILE,
                                                         TRAINER_STATE, Lineage, fsync_dir, local_lineages,
                                                         prune_plan, read_abandoned, read_latest, read_lineage,
                                                         step_dir_name, with_abandoned, write_atomic,
                                                         write_complete_marker)
from clicktower.launcher.engine.checkpoint.restore import (all_gather_objects, load_checkpoint, nonfinite_weights,
                                                           resolve_resume, topology)
from clicktower.launcher.engine.checkpoint.remote import RemoteCheckpoints
from clicktower.launcher.engine.checkpoint.state import Snapshot, capture_state
from clicktower.launcher.engine.metrics import MetricsLog
from clicktower.launcher.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["CheckpointConfig", "Checkpointer"]


@dataclass
class CheckpointConfig:
    """Checkpoint section of the experiment config.

    Args:
        every_steps: save every N optimiser steps (None: not by steps).
        every_minutes: save when this many minutes passed since the last save (None: not by
            time). Both may be set; the first due triggers a save.
        keep_last: complete checkpoints kept; older ones are deleted after a new one lands
            (in ``remote_dir`` too).
        verify_checksums: check every file's sha256 before resuming from a checkpoint.
        async_save: copy the state to host memory at the step boundary and write and hash
            it in a background thread while training goes on (at most one save in flight;
            costs one copy of the state in host memory).
        remote_dir: also keep checkpoints in object storage (``s3://bucket/runs/x``, any
            URL the data layer reads, or a folder path): each complete checkpoint, then
            ``final/`` and ``best/``, is uploaded by rank 0 in the background, never
            stalling a step (a checkpoint still waiting for its upload is superseded by the
            next one); ``train.resume=auto`` looks there too. Credentials and endpoints come from the
            store library's own settings (``AWS_ENDPOINT_URL``...) or ``storage_options``.
        storage_options: fsspec options for ``remote_dir``.
        remote_retries: retries of a transient remote failure per request (backoff doubling
            from 0.2 s); an upload that still fails is warned about and counted, and
            training goes on.
    """

    every_steps: int | None = None
    every_minutes: float | None = None
    keep_last: int = 2
    verify_checksums: bool = True
    async_save: bool = False
    remote_dir: str | None = None
    storage_options: dict[str, Any] | None = None
    remote_retries: int = 5

    def __post_init__(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1, got {self.every_steps}")
        if self.every_minutes is not None and self.every_minutes <= 0:
            raise ValueError(f"checkpoint.every_minutes must be > 0, got {self.every_minutes}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        if self.remote_dir is not None and not str(self.remote_dir).strip():
            raise ValueError("checkpoint.remote_dir must be a URL or folder path (or null)")
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise ValueError(f"checkpoint.storage_options must be a mapping, got {self.storage_options!r}")
        if self.remote_retries < 0:
            raise ValueError(f"checkpoint.remote_retries must be >= 0, got {self.remote_retries}")


def continue_lineage(folder: Path | None, setting: str, root: Path,
                     remote: RemoteCheckpoints | None) -> tuple[str, int | None, int]:
    """The lineage a run continues, as (id, parent commit, next commit number): a fresh one
    without ``folder``, else ``folder``'s, numbered after every commit of it found here or
    remotely. A resume that goes back to an earlier commit (explicitly, or ``auto`` past a
    broken newer one) records the commits it leaves in ``abandoned.json``, here and remotely,
    before its first save, so that ``auto`` never takes them again (they are deleted at the
    next save, by the pruning), and points the local ``latest`` at the commit resumed.

    Args:
        folder: the checkpoint resumed from, or None.
        setting: ``train.resume``.
        root: the run's ``checkpoints/`` folder.
        remote: the run's remote checkpoints, or None.
    """
    here = local_lineages(root.parent)
    if folder is None:
        fresh = uuid.uuid4().hex[:12]
        if setting == "new" and here:
            print(f"train.resume=new: new run lineage {fresh} in {root}; the {len(here)} checkpoint(s) there "
                  "are kept, never pruned or resumed by it", flush=True)
        return fresh, None, 1
    lineage = read_lineage(folder)
    known = [lin.commit for lin in here.values() if lin.id == lineage.id]
    if remote is not None:
        known += [lin.commit for lin in remote.lineages().values() if lin.id == lineage.id]
    highest = max([lineage.commit, *known])
    left = [name for name, lin in here.items() if lin.id == lineage.id and lin.commit > lineage.commit]
    if left:
        print(f"train.resume={setting}: going back to commit {lineage.commit} of run lineage {lineage.id}; its "
              f"later checkpoint(s) {', '.join(left)} are deleted at the next save", flush=True)
    if highest > lineage.commit:
        # Written before anything else of this run: a kill before its first save must not let
        # ``auto`` (here, or a node reading the bucket) continue from a commit it went back from.
        root.mkdir(parents=True, exist_ok=True)
        record = with_abandoned(read_abandoned(root), lineage.id, lineage.commit, highest)
        write_atomic(root / ABANDONED, json.dumps(record, sort_keys=True) + "\n")
        if remote is not None:
            try:
                remote.record_abandoned(lineage.id, lineage.commit, highest)
            except Exception as exc:  # noqa: BLE001 - the local record holds; the run goes on
                logger.warning("checkpoint.remote_dir: recording the commits this resume left failed (%s); a node "
                               "resuming from the bucket before this run's first upload may take them",
                               describe_failure(exc))
    if folder.parent.resolve() == root.resolve() and read_latest(root) != folder.name:
        write_atomic(root / LATEST, folder.name + "\n")
    return lineage.id, lineage.commit, highest + 1


class _PendingSave:
    """A rank's part of a save: its snapshot being written (in a thread when async).

    Args:
        step: the step saved.
        snapshot: the captured state.
        background: write in a background thread.
    """

    def __init__(self, step: int, snapshot: Snapshot, background: bool) -> None:
        self.step, self.snapshot, self.folder = step, snapshot, snapshot.folder
        self.digests: dict[str, Any] | None = None
        self.error: str | None = None
        self.thread: threading.Thread | None = None
        if background:
            self.thread = threading.Thread(target=self._write, daemon=True, name="clicktower-checkpoint")
            self.thread.start()
        else:
            self._write()

    def _write(self) -> None:
        try:
            self.digests = self.snapshot.write()
        except Exception as exc:  # noqa: BLE001 - reported to every rank at the commit
            self.error = describe_failure(exc)

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()


def _refuse_nonfinite(accelerator: Any, step: int, last_saved: Path | None) -> None:
    """Raise on every rank when any rank's weights are not finite (collective): a NaN
    checkpoint would be resumed from, and fail, forever. The training step checks the loss and
    gradients first; this is the last line before the disk."""
    names = nonfinite_weights(accelerator)
    if names:
        raise FloatingPointError(
            f"refusing to checkpoint step {step}: {len(names)} model tensor(s) hold NaN or inf "
            f"(e.g. {names[0]}); the newest checkpoint stays {last_saved or 'as it was'}")


class Checkpointer:
    """Saves and restores the full training state through an ``accelerate.Accelerator``.

    Model, optimiser, registered objects (LR scheduler), grad scaler and every rank's RNG
    states are the files accelerate's ``save_state`` writes (the DeepSpeed engine writes its
    ZeRO shards, one file set per rank); the trainer's counters, the data loader position and
    the resolved config go into ``trainer_state.json`` and ``config.yaml``; the run's
    ``metrics.jsonl`` so far is copied in, and put back (up to the step) by a resume.

    Args:
        accelerator: the training accelerator (objects already prepared and registered).
        output_dir: the run's output folder.
        cfg: checkpoint config.
        config_yaml: the resolved experiment config, stored in every checkpoint.
        metrics: the run's ``metrics.jsonl`` (None: no metric history to keep).
    """

    def __init__(self, accelerator: Any, output_dir: str | Path, cfg: CheckpointConfig,
                 config_yaml: str, metrics: MetricsLog | None = None) -> None:
        self.accelerator, self.cfg, self.config_yaml, self.metrics = accelerator, cfg, config_yaml, metrics
        self.root = Path(output_dir) / CHECKPOINT_DIR
        self.last_save_time = time.monotonic()
        self.last_saved: Path | None = None
        self.pending: _PendingSave | None = None
        # The run lineage the next save continues (rank 0's; set by ``resume``, else minted
        # at the first save): its id, the commit it follows, and its commit number.
        self.lineage_id: str | None = None
        self.parent: int | None = None
        self.next_commit = 1
        self.remote = (RemoteCheckpoints(cfg.remote_dir, cfg.keep_last, cfg.storage_options, cfg.remote_retries)
                       if cfg.remote_dir else None)

    def remote_counts(self) -> dict[str, int]:
        """``remote_uploaded``, ``remote_retries`` and ``remote_failures`` of this start's
        checkpoint uploads (rank 0 uploads; empty without ``remote_dir``), for metrics.jsonl."""
        if self.remote is None:
            return {}
        return {f"remote_{name}": n for name, n in self.remote.counts.items()}

    def due(self, step: int) -> bool:
        """Whether a save is due after ``step`` (every rank must get the same answer).

        Time-based saves are decided on the main process and broadcast, so that ranks whose
        clocks differ by a hair never disagree.
        """
        by_steps = self.cfg.every_steps is not None and step % self.cfg.every_steps == 0
        if by_steps or self.cfg.every_minutes is None:
            return by_steps
        elapsed = (time.monotonic() - self.last_save_time) / 60.0
        return self._agree(elapsed >= self.cfg.every_minutes, "broadcast")

    def _agree(self, flag: bool, how: str) -> bool:
        """``flag`` of rank 0 (``broadcast``), or true only if true on every rank (``all``)."""
        import torch
        import torch.distributed as dist

        if self.accelerator.num_processes == 1 or not dist.is_initialized():
            return flag
        tensor = torch.tensor([1 if flag else 0], device=self.accelerator.device)
        if how == "broadcast":
            dist.broadcast(tensor, src=0)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return bool(tensor.item())

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Save ``step`` (collective: call on every rank). Synchronous saves are complete on
        return; async ones are committed by a later ``poll`` or ``wait``.

        Args:
            step: optimiser steps done.
            trainer_state: counters and loader position (JSON-serialisable).

        Returns:
            The checkpoint folder (there once committed).

        Raises:
            FloatingPointError: the model holds a NaN or an infinity (on every rank alike):
                nothing is written, and the checkpoints already there stay as they are.
        """
        self.wait()  # at most one save in flight
        acc = self.accelerator
        _refuse_nonfinite(self.accelerator, step, self.last_saved)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            # Left by a kill in the middle of a save, a download or a universal conversion.
            for pattern in (".tmp-step_*", ".download-step_*", ".universal-step_*"):
                for stale in self.root.glob(pattern):
                    shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        self.last_save_time = time.monotonic()
        # Collective under DeepSpeed; the small files (RNG, scheduler) are written here.
        snapshot = capture_state(acc, tmp, copy=self.cfg.async_save)
        if acc.is_main_process:
            (tmp / "config.yaml").write_text(self.config_yaml, encoding="utf-8")
            state = {**trainer_state, "step": step, "topology": topology(acc), "lineage": self._next_lineage()}
            if self.remote is not None:
                state["remote"] = dict(self.remote.counts)
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
            if self.metrics is not None and self.metrics.path.is_file():
                # Copied now, at the step boundary: the records up to this step, even when
                # the write below runs in the background while training appends more.
                shutil.copyfile(self.metrics.path, tmp / METRICS_FILE)
        self.pending = _PendingSave(step, snapshot, background=self.cfg.async_save)
        if not self.cfg.async_save:
            self.wait()
        return self.root / step_dir_name(step)

    def poll(self) -> None:
        """Commit the save in flight if every rank has written its part (collective: call on
        every rank at every step boundary; free when no save is in flight)."""
        if self.pending is not None and self._agree(self.pending.done(), "all"):
            self.wait()

    def wait(self) -> None:
        """Finish the save in flight, if any (collective): every rank's write done, the
        digests gathered into ``COMPLETE``, the folder renamed into place, ``latest`` written.

        Raises:
            RuntimeError: a rank failed to write its files (on every rank).
        """
        pending, acc = self.pending, self.accelerator
        if pending is None:
            return
        pending.join()
        self.pending = None
        results = all_gather_objects((acc.process_index, pending.digests, pending.error), acc)
        errors = [f"rank {rank}: {error}" for rank, _, error in results if error]
        if errors:
            raise RuntimeError(f"checkpoint {pending.folder} failed: {'; '.join(errors)}")
        final = self.root / step_dir_name(pending.step)
        if acc.is_main_process:
            digests = {name: entry for _, files, _ in results for name, entry in files.items()}
            write_complete_marker(pending.folder, pending.step, digests)
            if final.exists():  # a re-save of the same step after a resume
                other = read_lineage(final)
                if other is not None and other.id != self.lineage_id:
                    logger.warning("replacing checkpoint %s of another run (lineage %s)", final, other.id)
                shutil.rmtree(final)
            os.replace(pending.folder, final)
            fsync_dir(self.root)
            write_atomic(self.root / LATEST, final.name + "\n")  # the pointer last
            # No wait for the upload in flight (that stalled training on a slow store): this
            # one is queued (replacing one still waiting), and the pruning, after it, leaves
            # the folders being uploaded or queued.
            if self.remote is not None:
                best = self.root.parent / "best"
                self.remote.upload_async(final, best if best.is_dir() else None)
            self._prune()
        acc.wait_for_everyone()
        self.last_saved = final

    def _next_lineage(self) -> dict[str, Any]:
        """The ``lineage`` record of the save being made (rank 0), and the next one's parent."""
        if self.lineage_id is None:  # saved without ``resume`` (Python use): a fresh lineage
            self.lineage_id = uuid.uuid4().hex[:12]
        record = Lineage(self.lineage_id, self.next_commit, self.parent).record()
        self.parent, self.next_commit = self.next_commit, self.next_commit + 1
        return record

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` commits of this run's lineage: the checkpoint just
        committed (``latest``) and those that led to it; other lineages' are never touched.
        A folder still being uploaded (or queued) stays until a later pruning."""
        entries = local_lineages(self.root.parent)
        head = read_latest(self.root)
        uploading = self.remote.in_use() if self.remote is not None else set()
        for name in prune_plan(entries, head, self.cfg.keep_last, str(self.root)) if head in entries else []:
            if name not in uploading:
                shutil.rmtree(self.root / name, ignore_errors=True)

    def finish(self, final: Path | None = None) -> None:
        """End of the run or a stop (collective): commit the save in flight; rank 0 uploads
        ``final`` and ``best/`` and waits for its uploads.

        Args:
            final: the ``final/`` towers folder, once written (None: not yet, e.g. a stop).
        """
        self.wait()
        if self.remote is None or not self.accelerator.is_main_process:
            return
        self.remote.wait()
        self._prune()  # the folders the uploads kept
        try:
            if final is not None and final.is_dir():
                self.remote.upload_tree(final, "final")
            if (self.root.parent / "best").is_dir():
                self.remote.upload_best(self.root.parent / "best")
        except Exception as exc:  # noqa: BLE001 - the local folders are there
            self.remote.counts["failures"] += 1
            logger.warning("checkpoint.remote_dir: uploading final/ or best/ failed (%s)", describe_failure(exc))
        counts = self.remote.counts
        superseded = f"; {counts['superseded']} superseded before their upload started" if counts["superseded"] else ""
        print(f"checkpoint.remote_dir: {counts['uploaded']} checkpoint(s) uploaded to {self.remote.url} "
              f"({counts['retries']} retries, {counts['failures']} failed upload(s)){superseded}", flush=True)

    def resume(self, setting: str) -> dict[str, Any] | None:
        """Resolve ``train.resume`` and restore that checkpoint (collective).

        Args:
            setting: ``auto`` (the newest usable checkpoint of the run lineage ``latest``
                names, local or remote, if any), ``none`` (refused where checkpoints are),
                ``new`` (a new lineage beside any checkpoints there), or a checkpoint folder.

        Returns:
            The trainer state saved with it (step, data position), or None for a fresh run.

        Raises:
            ConfigError: ``checkpoint.remote_dir`` cannot be written (before any training);
                ``none`` in a folder with checkpoints; ``auto`` among several lineages that
                no ``latest`` pointer tells apart.
        """
        if self.remote is not None:
            problem = None
            if self.accelerator.is_main_process:
                try:
                    self.remote.check()
                except ConfigError as exc:
                    problem = str(exc)
            problem = all_gather_objects(problem, self.accelerator)[0]
            if problem:
                raise ConfigError(problem)
        folder = resolve_resume(self.accelerator, self.root, setting, self.cfg.verify_checksums, self.remote)
        if self.accelerator.is_main_process:
            self.lineage_id, self.parent, self.next_commit = continue_lineage(folder, setting, self.root, self.remote)
        if folder is None:
            return None
        state = self.load(folder)
        if self.metrics is not None:  # each step once: the replayed steps' records go
            self.metrics.resume(int(state["step"]), folder / METRICS_FILE)
        self.accelerator.print(f"resumed from {folder} at step {state['step']}")
        return state

    def load(self, folder: Path) -> dict[str, Any]:
        """Restore everything ``save`` wrote; returns the trainer state (collective). On
        another topology a ZeRO checkpoint is converted (``restore.load_checkpoint``).

        Args:
            folder: a complete checkpoint folder.

        Raises:
            ConfigError: a checkpoint that this topology cannot load (the message says why).
        """
        return load_checkpoint(self.accelerator, folder, self.root)
