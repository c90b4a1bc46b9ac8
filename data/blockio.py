"""Reading runs of samples from shards: one ranged request per run, prefetched.

A *run* is a contiguous range of samples of one shard (``[lo, hi)``). ``BlockReader``
turns it into one request for the run's bytes (plain tar: exactly the samples' bytes;
``.tar.gz``: the gzip blocks that hold them, inflated block by block so that one corrupt
block costs only its own samples), after looking the offsets up in the shard's index,
which is read in chunks of ``INDEX_CHUNK`` entries and cached (one chunk serves many runs).
``Prefetcher`` keeps the runs of the next windows in flight on ``io_threads`` threads, at
most ``prefetch_blocks`` runs ahead of the one being decoded, so memory stays bounded.
``NodeCache`` (``data.cache_dir``) keeps fetched byte chunks on a local disk for later
epochs, shared by every process of the node, evicting the least recently used. Every file is
tied to the content the manifest names: a reader pins each file's size and version tag when it
first reads it (the size must be the manifest's), every read is checked against the pin, and
cache entries are keyed by the shard's manifest sha256 and the pin, never by the URL alone.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import zlib
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from clicktower.data.shards import SampleError
from clicktower.data.storage import (ContentChanged, FileVersion, Storage, changed_message, describe_failure,
                                     is_url)

INDEX_CHUNK = 8192          # index entries per read (64 KiB): one chunk serves ~8 runs
_NPY_HEADER = 128           # np.save's header for a 1-D uint64 array (format 1.0)
_NPY_MAGIC = b"\x93NUMPY"
_CACHED_INDEX_CHUNKS = 256  # per reader: 16 MiB at most
CACHE_CHUNK = 1 << 20       # node cache granularity (bytes of a file, aligned)


class NodeCache:
    """A node-local cache of file byte chunks (``CACHE_CHUNK`` aligned), in ``directory``,
    at most ``max_bytes``, the least recently used evicted first. Several processes may
    share one folder: writes are atomic (rename), eviction tolerates races.

    Args:
        directory: the cache folder (created).
        max_bytes: the size the cache is kept under.
    """

    def __init__(self, directory: str, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        os.makedirs(directory, exist_ok=True)
        self._added = 0

    def _file(self, url: str, content: str, chunk: int) -> str:
        # The content key (manifest sha256, size, version tag) is part of the name: shards
        # rewritten at the same URL never hit the old bytes (they age out by LRU).
        return os.path.join(self.directory, hashlib.sha1(f"{url}\n{content}".encode()).hexdigest()[:24] + f"-{chunk}")

    def get(self, url: str, content: str, chunk: int) -> bytes | None:
        """A cached chunk of ``url`` as it held ``content``, or None."""
        path = self._file(url, content, chunk)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            os.utime(path)   # most recently used
            return data
        except FileNotFoundError:
            return None

    def put(self, url: str, content: str, chunk: int, data: bytes) -> None:
        """Keep chunk ``chunk`` of ``url`` as it held ``content``."""
        path = self._file(url, content, chunk)
        tmp = f"{path}.tmp-{os.getpid()}-{id(data)}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        self._added += len(data)
        # Scanning the folder costs a stat per file: only after another tenth of the budget.
        if self._added >= self.max_bytes // 10:
            self._added = 0
            self.evict()

    def evict(self) -> None:
        """Delete the least recently used chunks until the cache is under 90% of its size."""
        entries = []
        with os.scandir(self.directory) as it:
            for e in it:
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime, st.st_size, e.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes * 0.9:
                break
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            total -= size

    def read(self, storage: Storage, url: str, start: int, end: int, version: FileVersion, content: str) -> bytes:
        """Bytes ``[start, end)`` of ``url`` through the cache (whole chunks are fetched).

        Args:
            storage: fetches what the cache lacks.
            url: the object.
            start: first byte.
            end: byte after the last.
            version: the object's pinned size and tag: fetched chunks must come from it.
            content: the cache key of that content (manifest sha256, size, tag).
        """
        parts = []
        for chunk in range(start // CACHE_CHUNK, (max(end, start + 1) - 1) // CACHE_CHUNK + 1):
            data = self.get(url, content, chunk)
            if data is None:
                lo = chunk * CACHE_CHUNK
                data = storage.read_range(url, lo, min(lo + CACHE_CHUNK, version.size), version)
                self.put(url, content, chunk, data)
            parts.append(data)
        data = b"".join(parts)
        first = start // CACHE_CHUNK * CACHE_CHUNK
        return data[start - first:end - first]


def scan_offsets(fh) -> np.ndarray:
    """Sample offsets of a version-1 shard (no index file): one pass over its tar headers."""
    offsets, last_key, end = [], None, 0
    with tarfile.open(fileobj=fh, mode="r:*") as tar:
        for member in tar:
            key = os.path.basename(member.name).partition(".")[0]
            if key != last_key:
                offsets.append(member.offset)
                last_key = key
            end = member.offset_data + member.size + (-member.size % 512)
    return np.asarray(offsets + [end], dtype=np.uint64)


class _SingleFlightLRU:
    """A small LRU of loaded values where concurrent loads of one key make one request.

    The prefetcher reads several runs of one shard at once on its I/O threads; without this,
    each thread that misses the index cache fetched the same index chunk itself (measured: 17
    index reads for 12 shards at one rank, 51 instead of 48 at four simulated ranks).

    Args:
        capacity: values kept; the least recently used leaves first.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._values: OrderedDict = OrderedDict()
        self._loading: dict = {}
        self._lock = threading.Lock()

    def get(self, key, load: Callable[[], np.ndarray]) -> np.ndarray:
        """The value of ``key``, calling ``load()`` once if no thread has it or is loading it
        (a load's exception reaches every thread waiting for it; the next call retries)."""
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            pending = self._loading.get(key)
            if pending is None:
                pending = self._loading[key] = Future()
                owner = True
            else:
                owner = False
        if not owner:
            return pending.result()
        try:
            value = load()
        except BaseException as exc:
            with self._lock:
                del self._loading[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._loading[key]
            self._values[key] = value
            if len(self._values) > self.capacity:
                self._values.popitem(last=False)
        pending.set_result(value)
        return value


class BlockReader:
    """Reads runs of samples of one source's shards (see the module docstring).

    Args:
        source: the loader's view of one manifest (paths, counts, gzip blocks).
        storage: where the bytes come from (counts requests and retries).
        cache: optional node-local cache.
    """

    def __init__(self, source, storage: Storage, cache: NodeCache | None = None):
        self.source, self.storage, self.cache = source, storage, cache
        self._chunks = _SingleFlightLRU(_CACHED_INDEX_CHUNKS)   # (shard, chunk) -> entries
        self._scanned = _SingleFlightLRU(4)   # version-1 shards: shard -> scanned offsets
        self._pins: dict[str, FileVersion] = {}   # path -> the content this reader reads
        self._pin_lock = threading.Lock()

    def _pin(self, url: str, manifest_size: int | None, started: int) -> FileVersion:
        """The version of ``url`` this reader reads: asked on its first read (one metadata
        request), its size checked against the manifest's and its tag against the one the
        start-up check listed (``started``, a ``FileVersion.digest()``; 0: none), then fixed
        for every later read."""
        with self._pin_lock:
            pinned = self._pins.get(url)
        if pinned is not None:
            return pinned
        now = self.storage.version(url)
        if manifest_size is not None and now.size != manifest_size:
            raise ContentChanged(changed_message(f"{now.size} bytes, the manifest lists {manifest_size}"),
                                 source=url)
        if started and now.digest() and now.digest() != started:
            raise ContentChanged(changed_message(f"version {now.tag}, not the one listed when the loader started"),
                                 source=url)
        with self._pin_lock:
            return self._pins.setdefault(url, now)

    def _read(self, url: str, start: int, end: int, file_size: int | None, shard: int) -> bytes:
        """Bytes of ``url`` (shard ``shard`` or its index) from the content the manifest names
        (``file_size``: its size there; a shard found damaged at start is read as it is)."""
        started = int(self.source.table.versions[shard, 0 if url == self.source.path(shard) else 1])
        version = self._pin(url, None if shard in self.source.damaged else file_size, started)
        if self.cache is not None and is_url(url):
            # The shard's sha256 names the content of the shard and of its index alike.
            content = f"{self.source.sha256(shard)}:{version.size}:{version.tag}"
            return self.cache.read(self.storage, url, start, end, version, content)
        return self.storage.read_range(url, start, end, version)

    def _entries(self, shard: int, a: int, b: int) -> np.ndarray:
        """Index entries ``[a, b)`` of ``shard`` (offsets, then gzip block offsets)."""
        index = self.source.index(shard)
        if index is None:   # version 1: no index file, scan the tar once
            return self._scanned.get(shard, lambda: self._scan(shard))[a:b]
        parts = []
        for c in range(a // INDEX_CHUNK, (b - 1) // INDEX_CHUNK + 1):
            chunk = self._chunks.get((shard, c), lambda c=c: self._index_chunk(shard, index, c))
            lo = c * INDEX_CHUNK
            parts.append(chunk[max(a, lo) - lo:min(b, lo + INDEX_CHUNK) - lo])
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if len(out) < b - a:
            raise SampleError("truncated", f"index {index} ends at entry {a + len(out)}, "
                              f"entry {b - 1} is needed")
        return out

    def _scan(self, shard: int) -> np.ndarray:
        path = self.source.path(shard)
        data = io.BytesIO(self.storage.read_bytes(path)) if is_url(path) else open(path, "rb")
        with data as fh:
            return scan_offsets(fh)

    def _index_chunk(self, shard: int, index: str, c: int) -> np.ndarray:
        start = _NPY_HEADER + 8 * c * INDEX_CHUNK
        size = self.source.index_size(shard)
        data = self._read(index, 0 if c == 0 else start, start + 8 * INDEX_CHUNK, size, shard)
        if c == 0:
            if data[:6] != _NPY_MAGIC or b"<u8" not in data[:_NPY_HEADER]:
                raise SampleError("truncated", f"index {index} is not a uint64 .npy file")
            data = data[_NPY_HEADER:]
        return np.frombuffer(data[: len(data) // 8 * 8], dtype="<u8")

    def read_run(self, shard: int, lo: int, hi: int) -> list[bytes | SampleError]:
        """The tar bytes of samples ``lo .. hi-1`` of ``shard`` (a ``SampleError`` in place
        of each sample that cannot be had)."""
        n = int(self.source.listed[shard])
        gb = int(self.source.gzip_blocks[shard])
        offsets = self._entries(shard, lo, hi + 1).astype(np.int64)
        path = self.source.path(shard)
        size = int(self.source.sizes[shard])
        if not gb:
            data = self._read(path, int(offsets[0]), int(offsets[-1]), size, shard)
            return [_slice(data, int(offsets[i] - offsets[0]), int(offsets[i + 1] - offsets[0]))
                    for i in range(hi - lo)]
        b0, b1 = lo // gb, (hi - 1) // gb
        blocks = self._entries(shard, n + 1 + b0, n + 1 + b1 + 2).astype(np.int64)
        comp = self._read(path, int(blocks[0]), int(blocks[-1]), size, shard)
        out: list[bytes | SampleError] = []
        for b in range(b0, b1 + 1):
            first, last = max(lo, b * gb), min(hi, (b + 1) * gb)
            piece = comp[int(blocks[b - b0] - blocks[0]):int(blocks[b - b0 + 1] - blocks[0])]
            try:
                # A full flush starts every block: raw inflate can begin there.
                raw = zlib.decompressobj(-15).decompress(piece)
            except zlib.error as exc:
                out += [SampleError("corrupt_gzip", f"gzip block {b}: {exc}")] * (last - first)
                continue
            # The block's tar bytes start at the offset of its first sample.
            raw_start = int(self._entries(shard, b * gb, b * gb + 1)[0])
            for i in range(first, last):
                out.append(_slice(raw, int(offsets[i - lo]) - raw_start,
                                  int(offsets[i - lo + 1]) - raw_start, f"gzip block {b}"))
        return out


def _slice(data: bytes, a: int, b: int, where: str = "shard") -> bytes | SampleError:
    piece = data[a:b]
    if len(piece) < b - a:
        return SampleError("truncated", f"{where} ends before the sample does (needs "
                           f"{b - a} bytes at {a}, has {max(0, len(data) - a)})")
    return piece


class Prefetcher:
    """Runs read on ``threads`` threads, at most ``depth`` runs ahead of the window being
    decoded (a window's own runs are always all in flight).

    Args:
        windows: ``(window, runs)`` in reading order; a run is ``(source, shard, lo, hi)``.
        read: reads one run (``BlockReader.read_run`` of its source).
        threads: concurrent requests.
        depth: runs fetched ahead of the current window.
    """

    def __init__(self, windows: Iterable[tuple[object, Sequence[tuple]]],
                 read: Callable[[tuple], list], threads: int, depth: int):
        self._windows, self._read, self.depth = iter(windows), read, depth
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="clicktower-io")
        self._pending: deque[tuple[object, Sequence[tuple], list[Future]]] = deque()
        self._ahead = 0   # runs submitted for windows after the first pending one
        self._done = False

    def _fill(self) -> None:
        while not self._done and (not self._pending or self._ahead < self.depth):
            nxt = next(self._windows, None)
            if nxt is None:
                self._done = True
                return
            window, runs = nxt
            futures = [self._pool.submit(self._read, run) for run in runs]   # type: ignore[union-attr]
            if self._pending:
                self._ahead += len(futures)
            self._pending.append((window, runs, futures))

    def __iter__(self) -> Iterator[tuple[object, Sequence[tuple], list]]:
        """``(window, runs, results)``; a result is the run's list or the exception."""
        try:
            while True:
                self._fill()
                if not self._pending:
                    return
                window, runs, futures = self._pending.popleft()
                if self._pending:   # the next window is now the current one
                    self._ahead -= len(self._pending[0][2])
                results = []
                for f in futures:
                    exc = f.exception()
                    results.append(exc if exc is not None else f.result())
                self._fill()   # keep the next windows coming while this one is decoded
                yield window, runs, results
        finally:
            self.close()

    def close(self) -> None:
        """Cancel what is queued and stop the threads (idempotent)."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        for _, _, futures in self._pending:
            for f in futures:
                f.cancel()
        self._pending.clear()
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        except Exception:   # noqa: BLE001 - a generator finalised at interpreter exit
            pass


def run_failure(exc: BaseException, path: str) -> SampleError:
    """The ``SampleError`` every sample of a run gets when the run could not be read."""
    if isinstance(exc, SampleError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return SampleError("missing_shard", f"{path} is gone (deleted after the loader "
                           f"started?): {describe_failure(exc)}")
    return SampleError("io_error", f"cannot read {path}: {describe_failure(exc)}")
