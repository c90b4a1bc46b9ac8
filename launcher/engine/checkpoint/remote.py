"""Checkpoints in object storage (``checkpoint.remote_dir``): upload, prune, list, download.

The remote folder mirrors the run folder (``REMOTE/checkpoints/step_XXXXXXXX/``, ``latest``,
``final/``, ``best/``). A ``COMPLETE`` marker (every file's sha256) goes last: a checkpoint
without it is an unfinished upload (never resumed from, pruned); ``final/`` and ``best/`` lose
theirs first, drop stale files, and get the new one last (``download_tree`` reads them whole).
One upload runs in a background thread, one waits; a newer checkpoint supersedes the waiting
one, so training never waits for the store. Downloads are staged, verified, then renamed.
Filesystems come from ``Storage.filesystem`` (any URL ``clicktower.data.storage`` reads, or a
folder path), the requests and retries are this module's (transient failures retried with
backoff and counted). More: docs/checkpoints.md ("Checkpoints in object storage").
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from clicktower.data.storage import Storage, describe_failure, is_transient, is_url, join
from clicktower.launcher.engine.checkpoint.files import (ABANDONED, CHECKPOINT_DIR, COMPLETE, LATEST, STEP_DIR,
                                                         TRAINER_STATE, Abandoned, Lineage, check_checkpoint,
                                                         hash_files, lineage_head, parse_abandoned, parse_lineage,
                                                         prune_plan, sha256_file, with_abandoned)
from clicktower.launcher.errors import ConfigError

logger = logging.getLogger(__name__)
T = TypeVar("T")
_MAX_DEPTH = 16  # folder levels a checkpoint's files may sit under


def with_retries(call: Callable[[], T], max_retries: int, backoff_s: float, jitter: random.Random,
                 counts: dict[str, int]) -> T:
    """``call()``, retried on transient failures with exponential backoff and jitter.

    Args:
        call: the request.
        max_retries: retries before a transient failure is raised.
        backoff_s: first wait (doubled per retry, at most 10 s, times 0.5-1.5).
        jitter: the random source of the jitter (not the training RNGs).
        counts: its ``retries`` is incremented per retry.
    """
    for attempt in range(max_retries + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - every store library has its own types
            if attempt == max_retries or not is_transient(exc):
                raise
            counts["retries"] += 1
            time.sleep(min(backoff_s * 2 ** attempt, 10.0) * (0.5 + jitter.random()))
    raise AssertionError("unreachable")  # pragma: no cover


class RemoteFolder:
    """A remote folder (``checkpoint.remote_dir``): its requests, retried and counted, and the
    listing of the checkpoints in it.

    Args:
        url: the folder's URL or path.
        options: fsspec storage options (``checkpoint.storage_options``).
        max_retries: retries of a transient failure per request.
        backoff_s: first wait between retries (doubled each time, with jitter).
    """

    def __init__(self, url: str, options: dict[str, Any] | None = None, max_retries: int = 5,
                 backoff_s: float = 0.2) -> None:
        self.url = url.rstrip("/")
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.counts = {"uploaded": 0, "retries": 0, "failures": 0}
        self._storage = Storage(options, max_retries, backoff_s)
        self._jitter = random.Random()  # private: the training RNGs stay untouched

    # -- plumbing ------------------------------------------------------------------

    def _fs(self) -> Any:
        if is_url(self.url):
            return self._storage.filesystem(self.url)
        import fsspec

        return fsspec.filesystem("file")

    def path(self, *parts: str) -> str:
        """``REMOTE/part/part`` (URL or path).

        Args:
            parts: path components under the remote folder.
        """
        out = self.url
        for part in parts:
            out = join(out, part)
        return out

    def _retry(self, call: Callable[[], T]) -> T:
        return with_retries(call, self.max_retries, self.backoff_s, self._jitter, self.counts)

    def _put(self, local: Path, remote: str) -> None:
        fs = self._fs()
        if not is_url(remote):
            os.makedirs(os.path.dirname(remote), exist_ok=True)
        self._retry(lambda: fs.put_file(str(local), remote))

    # -- listing ---------------------------------------------------------------------

    def _listing_fs(self) -> Any:
        """The filesystem with its listing cache dropped: s3fs keeps every folder listing it
        made (the step folders' too, not only ``root``), which would hide what was uploaded
        since, by this process or another node."""
        fs = self._fs()
        fs.invalidate_cache()
        return fs

    def complete_steps(self) -> list[str]:
        """Names of the complete remote checkpoints, oldest first."""
        root = self.path(CHECKPOINT_DIR)
        fs = self._listing_fs()
        try:
            # on_error="raise": fsspec's walk otherwise drops a folder whose listing failed (a
            # 503, a timeout) and returns [] as if the bucket held no checkpoint.
            found = self._retry(lambda: fs.find(root, maxdepth=2, on_error="raise"))
        except FileNotFoundError:
            return []
        base = fs._strip_protocol(root).rstrip("/")
        names = set()
        for entry in found:
            rel = str(entry)[len(base):].strip("/")
            head, _, tail = rel.partition("/")
            if tail == COMPLETE and STEP_DIR.match(head):
                names.add(head)
        return sorted(names, key=lambda n: int(STEP_DIR.match(n).group(1)))

    def all_steps(self) -> list[str]:
        """Names of every remote ``step_`` folder, complete or not."""
        root = self.path(CHECKPOINT_DIR)
        fs = self._listing_fs()
        try:
            entries = self._retry(lambda: fs.ls(root, detail=False))
        except FileNotFoundError:
            return []
        names = [os.path.basename(str(e).rstrip("/")) for e in entries]
        return [name for name in names if STEP_DIR.match(name)]

    def latest(self) -> str | None:
        """The checkpoint name the remote ``latest`` pointer holds, if any."""
        fs = self._fs()
        try:
            return self._retry(lambda: fs.cat_file(self.path(CHECKPOINT_DIR, LATEST))).decode().strip() or None
        except FileNotFoundError:
            return None

    def abandoned(self) -> Abandoned:
        """The commits resumes went back from, recorded remotely (``files.ABANDONED``)."""
        fs = self._fs()
        try:
            return parse_abandoned(self._retry(lambda: fs.cat_file(self.path(CHECKPOINT_DIR, ABANDONED))).decode())
        except FileNotFoundError:
            return {}

    def record_abandoned(self, lineage_id: str, after: int, through: int) -> None:
        """Add a resume's go-back to the remote record (``files.with_abandoned``), so that a node
        resuming from the bucket does not take the commits it left.

        Args:
            lineage_id: the run lineage.
            after: the commit resumed from.
            through: the highest commit of the lineage found.
        """
        record = with_abandoned(self.abandoned(), lineage_id, after, through)
        fs, target = self._fs(), self.path(CHECKPOINT_DIR, ABANDONED)
        if not is_url(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        text = json.dumps(record, sort_keys=True).encode()
        self._retry(lambda: fs.pipe_file(target, text))

    def lineages(self, complete: list[str] | None = None) -> dict[str, Lineage]:
        """Lineage of every complete remote checkpoint (from its trainer state), by name; one
        whose trainer state cannot be read is named and left out.

        Args:
            complete: the names from ``complete_steps`` (None: listed here).
        """
        fs, out = self._fs(), {}
        for name in self.complete_steps() if complete is None else complete:
            try:
                state = self._retry(lambda: fs.cat_file(self.path(CHECKPOINT_DIR, name, TRAINER_STATE)))
                out[name] = parse_lineage(json.loads(state))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("skipping remote checkpoint %s: unreadable %s (%s)", self.path(CHECKPOINT_DIR, name),
                               TRAINER_STATE, describe_failure(exc))
        return out


    # -- whole folders (final/, best/) ---------------------------------------------------

    def upload_tree(self, folder: Path, name: str) -> None:
        """Upload a folder (``final/``, ``best/``) to ``REMOTE/name/``, atomically for readers
        that honour its ``COMPLETE`` marker (``download_tree``): the old marker is deleted
        first, every file is uploaded, the remote files the new folder does not have are
        deleted, and the new marker (every file's sha256 and size) goes last. A kill part way
        leaves no marker: readers refuse the folder until the next upload completes.

        Args:
            folder: the local folder.
            name: its name under the remote folder.
        """
        fs, remote = self._fs(), self.path(name)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)
        digests = hash_files(folder, files)  # before the upload: a marker lists what was sent
        try:
            self._retry(lambda: fs.rm_file(join(remote, COMPLETE)))
        except FileNotFoundError:
            pass
        for rel in files:
            self._put(folder / rel, join(remote, rel))
        for stale in sorted(set(self._tree_files(name)) - set(files) - {COMPLETE}):
            self._retry(lambda: fs.rm_file(join(remote, stale)))
        marker = json.dumps({"files": digests}, indent=1) + "\n"
        self._retry(lambda: fs.pipe_file(join(remote, COMPLETE), marker.encode()))

    def _tree_files(self, name: str) -> list[str]:
        """Paths of every file under ``REMOTE/name/``, relative to it."""
        root = self.path(name)
        fs = self._listing_fs()
        try:
            found = self._retry(lambda: fs.find(root))
        except FileNotFoundError:
            return []
        base = fs._strip_protocol(root).rstrip("/")
        return [str(entry)[len(base):].strip("/") for entry in found]

    def download_tree(self, name: str, dest: Path) -> Path:
        """Download ``REMOTE/name/`` (``final/``, ``best/``) as its last complete upload left it:
        the files its ``COMPLETE`` marker lists, each verified against the marker's sha256,
        into a staging folder renamed to ``dest``.

        Args:
            name: the folder's name under the remote folder.
            dest: the local folder to create (must not exist).

        Raises:
            ValueError: no marker (never uploaded, or an upload in progress or killed), or a
                file that does not match it (replaced by an upload that started meanwhile).
            FileExistsError: ``dest`` exists.
        """
        fs, remote = self._fs(), self.path(name)
        if dest.exists():
            raise FileExistsError(f"{dest} exists")
        try:
            marker = self._retry(lambda: fs.cat_file(join(remote, COMPLETE)))
        except FileNotFoundError:
            raise ValueError(f"{remote}: no {COMPLETE} marker (not uploaded, or an upload is in progress or was "
                             "interrupted)") from None
        files = json.loads(marker)["files"]
        staging = dest.parent / f".download-{dest.name}-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            for rel, entry in files.items():
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                self._retry(lambda: fs.get_file(join(remote, rel), str(staging / rel)))
                if sha256_file(staging / rel) != entry["sha256"]:
                    raise ValueError(f"{join(remote, rel)} does not match its {COMPLETE} marker (a new upload "
                                     "started while downloading?); try again")
            os.replace(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest


class RemoteCheckpoints(RemoteFolder):
    """A run's checkpoints in object storage; uploads run in one background thread.

    Args:
        url: ``checkpoint.remote_dir``.
        keep_last: complete checkpoints kept remotely (``checkpoint.keep_last``).
        options: fsspec storage options (``checkpoint.storage_options``).
        max_retries: retries of a transient failure per request.
        backoff_s: first wait between retries (doubled each time, with jitter).
    """

    def __init__(self, url: str, keep_last: int, options: dict[str, Any] | None = None,
                 max_retries: int = 5, backoff_s: float = 0.2) -> None:
        super().__init__(url, options, max_retries, backoff_s)
        self.keep_last = keep_last
        self.counts["superseded"] = 0
        # The uploader: its thread (None when idle), the upload it runs and the one waiting,
        # each (checkpoint folder, staged best/ copy or None); all guarded by the lock.
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._active: tuple[Path, Path | None] | None = None
        self._queued: tuple[Path, Path | None] | None = None
        self._best_step: int | None = None  # of the best/ uploaded last
        self._best_staged: int | None = None  # of the best/ staged last (training thread)

    # -- start-up ------------------------------------------------------------------

    def check(self) -> None:
        """Fail fast when the remote folder cannot be written (before any training).

        Raises:
            ConfigError: unreachable endpoint, missing bucket, no permission (after the retries).
        """
        probe = self.path(f".clicktower-probe-{socket.gethostname()}-{os.getpid()}")
        fs = self._fs()
        try:
            if not is_url(self.url):
                os.makedirs(self.url, exist_ok=True)
            self._retry(lambda: fs.pipe_file(probe, b"ok"))
            self._retry(lambda: fs.rm_file(probe))
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"checkpoint.remote_dir={self.url}: cannot write there "
                              f"({describe_failure(exc)})") from None

    # -- uploads (main process, background) ----------------------------------------

    def wait(self) -> None:
        """Wait until every queued upload is done (the end of the run, a stop)."""
        thread = self._thread  # the uploader clears it (under the lock) once the queue is empty
        if thread is not None:
            thread.join()

    def in_use(self) -> set[str]:
        """Names of the local checkpoint folders being uploaded or queued: the local pruning
        leaves them (a later save's pruning deletes them)."""
        with self._lock:
            return {job[0].name for job in (self._active, self._queued) if job is not None}

    def upload_async(self, folder: Path, best: Path | None = None) -> None:
        """Upload a complete local checkpoint (then prune remotely), and ``best`` when it
        holds another best model than the one staged last, in the background, without
        waiting: one upload runs at a time and one waits behind it; a newer checkpoint
        replaces a waiting one whose upload has not started (counted ``superseded``, warned
        about), so a slow store never stalls training and the bucket gets the newest.

        Args:
            folder: a complete ``step_XXXXXXXX`` folder (kept by the local pruning while
                ``in_use``).
            best: the run's ``best/`` folder, if any. A changed one is copied here, on the
                calling (training) thread, to ``checkpoints/.best-upload-STEP``: the periodic
                evaluation may rewrite ``best/`` while the upload runs.
        """
        if self._thread is None:  # idle (only this thread starts uploads): copies a kill left are garbage
            for stale in folder.parent.glob(".best-upload-*"):
                shutil.rmtree(stale, ignore_errors=True)
        staged = None
        if best is not None and self._best_step_of(best) not in (None, self._best_staged):
            staged = folder.parent / f".best-upload-{folder.name}"
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(best, staged)
            self._best_staged = self._best_step_of(best)
        with self._lock:
            if self._queued is not None:
                dropped, dropped_best = self._queued
                self.counts["superseded"] += 1
                logger.warning("checkpoint.remote_dir: %s superseded by %s before its upload started (uploads are "
                               "slower than the checkpoints)", dropped.name, folder.name)
                if staged is None:  # the best/ it carried is still the newest one
                    staged = dropped_best
                elif dropped_best is not None:
                    shutil.rmtree(dropped_best, ignore_errors=True)
            self._queued = (folder, staged)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run_queue, daemon=True, name="clicktower-upload")
                self._thread.start()

    def _run_queue(self) -> None:
        """The uploader thread: the queued upload, until none is queued."""
        while True:
            with self._lock:
                self._active, self._queued = self._queued, None
                if self._active is None:
                    self._thread = None
                    return
                job = self._active
            self._upload_job(*job)

    def _upload_job(self, folder: Path, best: Path | None) -> None:
        try:
            self.upload_checkpoint(folder)
            self.counts["uploaded"] += 1
            self.prune(folder.name)
            if best is not None:
                self.upload_best(best)
        except Exception as exc:  # noqa: BLE001 - a failed upload must not stop training
            self.counts["failures"] += 1
            logger.warning("checkpoint.remote_dir: uploading %s to %s failed (%s); the local checkpoint is kept "
                           "(%d upload failure(s), %d retries so far)", folder, self.url,
                           describe_failure(exc), self.counts["failures"], self.counts["retries"])
        finally:
            if best is not None:
                shutil.rmtree(best, ignore_errors=True)  # the staged copy

    def upload_checkpoint(self, folder: Path) -> str:
        """Upload ``folder`` under ``REMOTE/checkpoints/`` (its marker last), then ``latest``.

        Args:
            folder: a complete local ``step_XXXXXXXX`` folder.

        Returns:
            Its remote URL.
        """
        remote = self.path(CHECKPOINT_DIR, folder.name)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)
        for path in files + [folder / COMPLETE]:  # the marker last: it makes it a candidate
            self._put(path, join(remote, str(path.relative_to(folder))))
        fs = self._fs()
        self._retry(lambda: fs.pipe_file(self.path(CHECKPOINT_DIR, LATEST), (folder.name + "\n").encode()))
        return remote

    @staticmethod
    def _best_step_of(best: Path) -> int | None:
        """The step in a ``best/`` folder's ``best.json`` (None: no model there yet)."""
        marker = best / "best.json"
        return json.loads(marker.read_text()).get("step") if marker.is_file() else None

    def upload_best(self, best: Path) -> None:
        """Upload a ``best/`` folder when it holds another best model than the one uploaded
        last (call it when nothing rewrites the folder meanwhile).

        Args:
            best: ``best/`` or a copy of it (with ``best.json``, written by the periodic
                evaluation).
        """
        step = self._best_step_of(best)
        if step not in (None, self._best_step):
            self.upload_tree(best, "best")
            self._best_step = step

    # -- pruning, download --------------------------------------------------------------

    def prune(self, head: str | None = None) -> None:
        """Keep the newest ``keep_last`` commits of ``head``'s run lineage (``head`` and the
        commits that led to it); delete the lineage's other complete checkpoints (older ones,
        and those a resume went back from, named) and unfinished uploads of earlier steps
        (marker first, so that a half-deleted checkpoint is never a candidate). Other
        lineages' checkpoints are left alone.

        Args:
            head: the checkpoint just uploaded (None: the one ``latest`` names).
        """
        complete = self.complete_steps()
        entries = self.lineages(complete)
        head = head if head in entries else lineage_head(entries, self.latest(), self.path(CHECKPOINT_DIR))
        if head is None:
            return
        doomed = set(prune_plan(entries, head, self.keep_last, self.path(CHECKPOINT_DIR)))
        newest = int(STEP_DIR.match(head).group(1))
        # Unfinished uploads of earlier steps are garbage; a later one may be in progress.
        doomed |= {n for n in self.all_steps() if n not in complete and int(STEP_DIR.match(n).group(1)) < newest}
        fs = self._fs()
        for name in sorted(doomed):
            remote = self.path(CHECKPOINT_DIR, name)
            if name in complete:
                self._retry(lambda: fs.rm_file(join(remote, COMPLETE)))
            # Listed here, not by rm(recursive=True), whose walk skips a failed listing silently
            # (a maxdepth makes every fsspec store walk, where on_error is understood).
            files = self._retry(lambda: fs.find(remote, maxdepth=_MAX_DEPTH, on_error="raise"))
            if files:
                self._retry(lambda: fs.rm(files))

    def download(self, name: str, root: Path, verify_checksums: bool = True) -> Path:
        """Download complete remote checkpoint ``name`` into ``root/name``, verified.

        Args:
            name: a ``step_XXXXXXXX`` name from ``complete_steps``.
            root: the local ``checkpoints/`` folder.
            verify_checksums: verify every file's sha256 (else sizes only).

        Raises:
            ValueError: the downloaded files do not match the marker.
        """
        fs, remote = self._fs(), self.path(CHECKPOINT_DIR, name)
        marker = self._retry(lambda: fs.cat_file(join(remote, COMPLETE)))
        files = json.loads(marker)["files"]
        # Node-unique staging: nodes sharing a file system may download at the same time.
        staging = root / f".download-{name}-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        for rel in files:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            self._retry(lambda: fs.get_file(join(remote, rel), str(staging / rel)))
        (staging / COMPLETE).write_bytes(marker)
        problem = check_checkpoint(staging, verify_checksums)
        if problem:
            shutil.rmtree(staging, ignore_errors=True)
            raise ValueError(f"{remote}: {problem}")
        final = root / name
        if final.exists() and check_checkpoint(final, verify_checksums) is not None:
            shutil.rmtree(final, ignore_errors=True)  # a broken local copy of the same step
        try:
            os.replace(staging, final)
        except OSError:  # another node renamed its copy first (shared file system)
            shutil.rmtree(staging, ignore_errors=True)
        return final
