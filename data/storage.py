"""Where shards live: local or shared paths and URLs (``s3://``, ``gs://``, ``http(s)://``...).

One small interface for everything ``clicktower.data`` reads or writes: ranged reads, whole
reads, sizes, listings, writes. Local paths go straight to the OS (``os.pread`` on a few
cached descriptors); URLs go through fsspec (s3fs, gcsfs, aiohttp; any other protocol fsspec
knows passes through). Retries are ours, not the store library's: s3fs and botocore are told
to try once (``DEFAULT_OPTIONS``) so that every retry is counted (``IOStats.retries``) and
bounded by ``max_retries`` with exponential backoff; only transient errors (timeouts, dropped
connections, HTTP 429 or 5xx) are retried. clicktower reads no environment variable here: the
store libraries read their own.

Why fsspec rather than obstore, and the retry policy: docs/data.md ("Data on object storage").
"""
from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from clicktower.data.errors import DataError

T = TypeVar("T")

DEFAULT_MAX_RETRIES = 5
DEFAULT_BACKOFF_S = 0.2     # first wait; doubled per retry, with jitter, at most _MAX_WAIT_S
_MAX_WAIT_S = 10.0
_OPEN_FILES = 16            # local descriptors kept open per Storage

# Per protocol: the pip extra that brings its fsspec implementation, and options that make
# the library try each request once (our retry loop counts and bounds the retries).
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {"config_kwargs": {"retries": {"total_max_attempts": 1}}},
    "gs": {"retries": 1},
}
_EREMOTEIO = getattr(errno, "EREMOTEIO", 121)
_TRANSIENT_ERRNO = {errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                    errno.ECONNREFUSED, errno.EPIPE, errno.EAGAIN, _EREMOTEIO}
# ChecksumError: botocore's FlexibleChecksumError, the body received does not match the
# checksum the server sent (cut or damaged in transit): another attempt gets the right bytes.
_TRANSIENT_NAMES = ("Timeout", "ServerDisconnected", "ClientConnector", "ClientPayload",
                    "ConnectionClosed", "EndpointConnection", "IncompleteRead", "ResponseParser",
                    "ClientOS", "ProtocolError", "RemoteDisconnected", "ChecksumError")


def is_url(path: str) -> bool:
    """True for ``scheme://...`` other than ``file://`` (those go through fsspec)."""
    head, sep, _ = str(path).partition("://")
    return bool(sep) and head.isidentifier() and head.lower() != "file"


def local_path(path: str) -> str:
    """``file:///x`` -> ``/x``; other paths unchanged."""
    path = os.fspath(path)
    return path[7:] if path.startswith("file://") else path


def join(root: str, rel: str) -> str:
    """``rel`` under ``root`` (a folder path or URL), normalised (``a/./b`` -> ``a/b``)."""
    if not is_url(root):
        return os.path.normpath(os.path.join(local_path(root), rel))
    scheme, _, rest = root.partition("://")
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, rel))}"


def parent(path: str) -> str:
    """The folder holding ``path`` (path or URL)."""
    if not is_url(path):
        return os.path.dirname(os.path.abspath(local_path(path)))
    scheme, _, rest = path.partition("://")
    return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"


def basename(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/")) if is_url(path) else os.path.basename(path)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is worth retrying: timeouts, dropped connections,
    HTTP 429 and 5xx. A missing object or a denied request is not."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            return False
        status = getattr(exc, "status", None)   # aiohttp.ClientResponseError
        response = getattr(exc, "response", None)   # botocore ClientError
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", status)
        if isinstance(status, int) and (status == 429 or status >= 500):
            return True
        if isinstance(exc, (TimeoutError, ConnectionError)):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
            return True
        if any(name in type(exc).__name__ for name in _TRANSIENT_NAMES):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


# Object metadata naming one version of an object's content: the ETag first (S3, GCS, most
# HTTP servers; in listings and in a HEAD alike, so the two compare), then a GCS generation
# or S3 version id, then a modification time.
_VERSION_FIELDS = ("ETag", "etag", "generation", "VersionId", "LastModified", "last_modified", "mtime", "updated")


@dataclass(frozen=True)
class FileVersion:
    """Which content a path or URL holds: its size and a tag that changes when the content is
    replaced (S3 version id or ETag, GCS generation, HTTP ETag; a local file's inode and
    modification time; empty where the store gives none: then only the size tells).

    Args:
        size: bytes.
        tag: the store's version tag.
    """

    size: int
    tag: str = ""

    def digest(self) -> int:
        """The tag as a non-zero 64-bit number (0 where there is no tag): what the start-up
        check keeps per file, 8 bytes instead of the string."""
        if not self.tag:
            return 0
        return int.from_bytes(hashlib.blake2b(self.tag.encode(), digest_size=8).digest(), "little") | 1

    def change(self, now: "FileVersion") -> str | None:
        """What differs in ``now`` (None: nothing), e.g. ``size 1200 -> 1180``."""
        if now.size != self.size:
            return f"size {self.size} -> {now.size}"
        if now.tag != self.tag:
            return f"version {self.tag or '?'} -> {now.tag or '?'}"
        return None


class ShortRead(OSError):
    """A ranged read returned fewer bytes than the object holds there: transient (retried)."""


class ContentChanged(DataError):
    """A shard or index no longer holds the content the loader started reading: reading on
    would mix two versions of the data, so the read is refused (never a bad sample)."""


class IOStats:
    """What a ``Storage`` did: requests (ranged and whole reads, writes), metadata calls
    (sizes, listings), bytes read, retries. Prefetch threads add to it: under a lock."""

    NAMES = ("requests", "metadata", "bytes_read", "retries")

    def __init__(self):
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(self.NAMES, 0)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                self.counts[name] += n

    def __getattr__(self, name: str) -> int:
        if name in IOStats.NAMES:
            return self.counts[name]
        raise AttributeError(name)

    def take(self) -> dict[str, int]:
        """The counts so far, reset to zero."""
        with self._lock:
            out, self.counts = self.counts, dict.fromkeys(self.NAMES, 0)
        return out


def _new_filesystem(protocol: str, options: dict[str, Any], url: str) -> Any:
    """A fresh fsspec filesystem for ``protocol`` with ``DEFAULT_OPTIONS`` under ``options``;
    ``url`` only names the source in errors."""
    try:
        import fsspec

        kwargs = merge_options(DEFAULT_OPTIONS.get(protocol, {}), options)
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **kwargs)
    except ImportError as exc:
        extra = EXTRAS.get(protocol)
        hint = (f"pip install 'clicktower[{extra}]'" if extra else
                f"install the fsspec implementation of {protocol}://")
        raise DataError(f"reading {protocol}:// needs the '{extra or protocol}' extra: "
                        f"{hint} ({exc})", source=url) from None
    except ValueError as exc:   # fsspec: "Protocol not known"
        raise DataError(f"unsupported URL scheme {protocol}:// ({exc})", source=url) from None
    if hasattr(fs, "retries"):   # s3fs's own retry loop: once (ours counts)
        fs.retries = 1
    return fs


class Storage:
    """Reads and writes local paths and URLs with counted, bounded retries.

    Args:
        options: fsspec storage options (``data.storage_options``), passed to every URL
            filesystem on top of ``DEFAULT_OPTIONS`` (yours win).
        max_retries: retries of a transient failure before it counts as persistent.
        backoff_s: first wait between retries (doubled each time, with jitter).
    """

    def __init__(self, options: dict[str, Any] | None = None,
                 max_retries: int = DEFAULT_MAX_RETRIES, backoff_s: float = DEFAULT_BACKOFF_S):
        self.options = dict(options or {})
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.stats = IOStats()
        self._fs: dict[str, Any] = {}
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self._jitter = random.Random()   # private: never touches the global RNG training seeds

    def __getstate__(self) -> dict:   # loader workers rebuild filesystems and descriptors
        state = dict(self.__dict__)
        state.update(_fs={}, _fds=OrderedDict(), _lock=None, stats=IOStats())
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    # -- the filesystem behind a URL ---------------------------------------------------

    def filesystem(self, url: str) -> Any:
        """The fsspec filesystem for ``url``'s protocol (one per protocol and Storage)."""
        protocol = url.partition("://")[0].lower()
        fs = self._fs.get(protocol)
        if fs is None:
            fs = self._fs[protocol] = _new_filesystem(protocol, self.options, url)
        return fs

    def _retry(self, url: str, call: Callable[[], T]) -> T:
        for attempt in range(self.max_retries + 1):
            try:
                return call()
            except DataError:
                raise
            except Exception as exc:   # noqa: BLE001 - every store library has its own types
                if attempt == self.max_retries or not is_transient(exc):
                    if isinstance(exc, OSError) and exc.filename is None and type(exc).__module__ == "builtins":
                        # s3fs's "The specified bucket does not exist" names no URL: add it.
                        raise type(exc)(exc.errno, exc.strerror or str(exc), url) from exc
                    raise
                self.stats.add(retries=1)
                wait = min(self.backoff_s * 2 ** attempt, _MAX_WAIT_S)
                time.sleep(wait * (0.5 + self._jitter.random()))
        raise AssertionError("unreachable")   # pragma: no cover

    # -- reading -----------------------------------------------------------------------

    def _pread(self, path: str, size: int, offset: int, version: FileVersion | None = None) -> bytes:
        # Under the lock: another thread may otherwise close (evict) the descriptor, or
        # reuse its number for another file, between the lookup and the read.
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
                if len(self._fds) > _OPEN_FILES:
                    os.close(self._fds.popitem(last=False)[1])
            else:
                self._fds.move_to_end(path)
            data = os.pread(fd, size, offset)
            # After the read: a rewrite before or during it shows in the descriptor's
            # size, inode or modification time (one fstat, no I/O).
            now = _local_version(os.fstat(fd)) if version is not None else None
        if now is not None and version.change(now):
            raise ContentChanged(changed_message(version.change(now)), source=path)
        return data

    def read_range(self, path: str, start: int, end: int, version: FileVersion | None = None) -> bytes:
        """Bytes ``[start, end)`` of a file or object (shorter when the file is).

        Args:
            path: local path or URL.
            start: first byte.
            end: byte after the last.
            version: the content the bytes must come from (``version()`` of the path when
                the reader started on it): a local file is checked after the read, an object
                at a URL by its metadata after the read (one more metadata request).

        Raises:
            ContentChanged: the file or object holds other content than ``version``.
        """
        if version is not None and not is_url(path):
            data = self._pread(local_path(path), end - start, start, version)
            self.stats.add(requests=1, bytes_read=len(data))
            return data
        # The object's pinned size says how many bytes the range holds: fewer is a short read
        # (a body cut off behind a Content-Length that matched it), retried like a dropped one.
        expected = None if version is None else max(0, min(end, version.size) - start)
        data = self._read(path, start, end, expected)
        if version is not None:
            # Bytes from before a replacement are the old content, whole; a replacement
            # before the read shows in the metadata read after it.
            change = version.change(self.version(path))
            if change:
                raise ContentChanged(changed_message(change), source=path)
        return data

    def version(self, path: str) -> FileVersion:
        """The size and version tag of a file or object (a metadata request); freshly asked,
        not from a listing cache. ``FileNotFoundError`` when it is not there."""
        self.stats.add(metadata=1)
        if not is_url(path):
            return _local_version(os.stat(local_path(path)))
        fs = self.filesystem(path)
        fs.invalidate_cache(path)   # fsspec keeps listings: a replaced object must show
        info = self._retry(path, lambda: fs.info(path))
        if info.get("type") == "directory" or info.get("size") is None:
            raise FileNotFoundError(path)
        return FileVersion(int(info["size"]), _tag(info))

    def read_bytes(self, path: str) -> bytes:
        """The whole file or object."""
        return self._read(path, None, None)

    def _read(self, path: str, start: int | None, end: int | None, expected: int | None = None) -> bytes:
        if is_url(path):
            fs = self.filesystem(path)

            def fetch() -> bytes:
                got = fs.cat_file(path, start=start, end=end)
                if start is not None and len(got) > end - start:   # a server ignoring Range
                    got = got[start:end]
                if expected is not None and len(got) < expected:
                    raise ShortRead(_EREMOTEIO, f"short read: {len(got)} of {expected} bytes at {start}")
                return got

            data = self._retry(path, fetch)
        elif start is None:
            with open(local_path(path), "rb") as fh:
                data = fh.read()
        else:
            data = self._pread(local_path(path), end - start, start)
        self.stats.add(requests=1, bytes_read=len(data))
        return data

    def size(self, path: str) -> int:
        """Size in bytes; ``FileNotFoundError`` when it is not there."""
        self.stats.add(metadata=1)
        if is_url(path):
            fs = self.filesystem(path)
            info = self._retry(path, lambda: fs.info(path))
            if info.get("type") == "directory" or info.get("size") is None:
                raise FileNotFoundError(path)
            return int(info["size"])
        return os.stat(local_path(path)).st_size

    def is_dir(self, path: str) -> bool:
        """Whether ``path`` is a folder (an object-store prefix with objects under it)."""
        self.stats.add(metadata=1)
        if is_url(path):
            fs = self.filesystem(path)
            try:
                return bool(self._retry(path, lambda: fs.isdir(path)))
            except FileNotFoundError:
                return False
        return os.path.isdir(local_path(path))

    def exists(self, path: str) -> bool:
        self.stats.add(metadata=1)
        if is_url(path):
            fs = self.filesystem(path)
            return bool(self._retry(path, lambda: fs.exists(path)))
        return os.path.exists(local_path(path))

    def list_versions(self, folder: str) -> dict[str, FileVersion] | None:
        """``{name: FileVersion}`` of the files directly in ``folder``, or None where the
        store cannot list (HTTP) or the folder is not there. One call for a local folder, one
        per page of 1,000 keys on S3: the start-up check of many shards. Objects carry the
        store's version tag (S3 ETag...); local files none (node-local copies differ)."""
        self.stats.add(metadata=1)
        if not is_url(folder):
            try:
                with os.scandir(local_path(folder)) as entries:
                    return {e.name: FileVersion(e.stat().st_size) for e in entries if e.is_file()}
            except OSError:
                return None
        if folder.partition("://")[0].lower() in ("http", "https"):
            return None   # an HTML index page is not a listing
        fs = self.filesystem(folder)
        try:
            entries = self._retry(folder, lambda: fs.ls(folder, detail=True, refresh=True))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return {basename(e["name"]): FileVersion(int(e.get("size") or 0), _tag(e)) for e in entries
                if e.get("type") == "file"}

    # -- writing -----------------------------------------------------------------------

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file or object (a local file is written durably, then renamed)."""
        self.stats.add(requests=1)
        if is_url(path):
            fs = self.filesystem(path)
            self._retry(path, lambda: fs.pipe_file(path, data))
            return
        path = local_path(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def put_file(self, local: str, url: str) -> None:
        """Upload local file ``local`` to ``url``."""
        self.stats.add(requests=1)
        fs = self.filesystem(url)
        self._retry(url, lambda: fs.put_file(local, url))

    def remove(self, path: str) -> None:
        """Delete a file or object; a missing one is fine."""
        self.stats.add(requests=1)
        try:
            if is_url(path):
                fs = self.filesystem(path)
                self._retry(path, lambda: fs.rm_file(path))
            else:
                os.remove(local_path(path))
        except FileNotFoundError:
            pass


def glob_urls(storage: Storage, pattern: str) -> list[str]:
    """The URLs matching a glob ``pattern`` at a URL (``s3://logs/2024-*/part-*.jsonl``),
    sorted; the listings retried and counted by ``storage`` (a 503 used to stop ``clicktower
    shard``).

    Args:
        storage: the filesystems and the retry policy.
        pattern: a URL with ``*``, ``?`` or ``[...]``.
    """
    storage.stats.add(metadata=1)
    fs = storage.filesystem(pattern)
    protocol = pattern.partition("://")[0]
    return sorted(f"{protocol}://{m}" for m in storage._retry(pattern, lambda: fs.glob(pattern)))


def merge_options(defaults: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """``options`` over ``defaults``, nested mappings merged key by key: a user's
    ``config_kwargs: {read_timeout: 5}`` keeps the default ``config_kwargs.retries`` (one
    attempt per request), which replacing the whole mapping would drop, and botocore would then
    retry 5xx answers itself, uncounted and unbounded by ``max_retries``.

    Args:
        defaults: ``DEFAULT_OPTIONS`` of a protocol.
        options: the user's storage options (theirs win where both set a value).
    """
    out = dict(defaults)
    for key, value in options.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_options(out[key], value) if both else value
    return out


def changed_message(change: str) -> str:
    """The one line of a ``ContentChanged``: what changed, and why reading stops."""
    return (f"replaced while the loader reads it ({change}): not mixing two versions of the data; "
            f"write a new manifest for the new files and restart")


def _tag(info: dict[str, Any]) -> str:
    """The version tag in an fsspec info or listing entry ("" where it has none)."""
    return next((str(info[k]) for k in _VERSION_FIELDS if info.get(k) not in (None, "")), "")


def _local_version(st: os.stat_result) -> FileVersion:
    # A rewrite in place changes the modification time; a replacement by rename, the inode.
    return FileVersion(st.st_size, f"{st.st_ino}:{st.st_mtime_ns}")


def describe_failure(exc: BaseException) -> str:
    """One line for a persistent read failure (the exception's type and first line)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
