"""Shard manifests: the format's names, loading and validating a manifest, its shard table.

A manifest (``manifest.json``, written last by ``clicktower shard``) lists per shard only
its path (relative to the manifest), sample count, bytes and sha256; the index's name and
size follow from them. ``load_manifest`` reads it from a local path or a URL (see
``clicktower.data.storage``) into a compact ``ShardTable`` and, unless told not to, checks
that every shard and index is there with the right size.

That check is the start-up cost at scale: it lists each folder of shards once (one call for
a local folder, one per 1,000 objects on S3) instead of asking for every file's size, and
falls back to one size request per file where the store cannot list (HTTP). In a
distributed run one rank does it and the others receive its findings
(``ClickPairLoader(..., broadcast_object=...)``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from clicktower.data.errors import DataError, short_repr
from clicktower.data.storage import FileVersion, Storage, basename, describe_failure, is_url, join, parent

__all__ = ["FORMAT", "MANIFEST_NAME", "VERSION", "ShardTable", "check_shard_files",
           "index_bytes", "index_entries", "index_path", "load_manifest", "read_manifest_json"]

FORMAT = "clicktower.clickpairs"
VERSION = 3
# version 1: no index (readers scan the tar); 2: index name and size listed per shard
READ_VERSIONS = (1, 2, 3)
MANIFEST_NAME = "manifest.json"
INDEX_SUFFIX = ".idx.npy"
REQUIRED_FIELDS = ("query", "item_id", "item_text")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_NPY_HEADER = 128


def shard_name(number: int, gz: bool = False) -> str:
    """File name of shard ``number`` (relative to the manifest)."""
    return f"shard-{number:06d}" + (".tar.gz" if gz else ".tar")


def index_entries(num_samples: int, gzip_block: int | None) -> int:
    """Length of a shard's index: ``num_samples + 1`` offsets, plus ``blocks + 1`` compressed
    block offsets for a ``.tar.gz`` shard."""
    if not gzip_block:
        return num_samples + 1
    return num_samples + 1 + -(-num_samples // gzip_block) + 1


def index_bytes(num_samples: int, gzip_block: int | None) -> int:
    """Size of the ``.idx.npy`` file: numpy's 128-byte header (format 1.0, a 1-D uint64
    array) plus 8 bytes an entry."""
    return _NPY_HEADER + 8 * index_entries(num_samples, gzip_block)


def index_path(shard_path: str) -> str:
    """The index file next to a shard: ``shard-000000.tar[.gz]`` -> ``shard-000000.idx.npy``."""
    base = shard_path[:-7] if shard_path.endswith(".tar.gz") else os.path.splitext(shard_path)[0]
    return base + INDEX_SUFFIX


def sha256_of(path: str, storage: Storage) -> str:
    """The sha256 of a file or object (read whole)."""
    digest = hashlib.sha256()
    if is_url(path):
        digest.update(storage.read_bytes(path))
    else:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


_SHARD_KEYS = ("path", "num_samples", "bytes", "sha256", "index", "index_bytes", "gzip_block")


def _compact_shard(obj: dict):
    """``json.load`` object hook: a shard entry becomes a tuple as soon as it is parsed, so
    that a manifest of many shards never exists as that many dicts at once."""
    if "path" in obj and "sha256" in obj and obj.keys() <= set(_SHARD_KEYS):
        return tuple(obj.get(k) for k in _SHARD_KEYS)
    return obj


class ShardTable(Sequence):
    """The shards of a loaded manifest, in compact arrays (about 80 bytes a shard, against
    about 1.6 KiB as dicts): counts, sizes, checksums and relative paths.

    ``table[i]`` builds the shard's dict on demand: ``{"path", "num_samples", "bytes",
    "sha256", "index"[, "gzip_block"][, "missing" | "damaged"]}`` with absolute paths.
    ``index`` is ``None`` for a version-1 shard (readers scan its tar instead).
    """

    def __init__(self, root: str, rel_paths: list[str], counts: list[int], sizes: list[int],
                 sha256: list[str], gzip_blocks: list[int], indexed: bool,
                 index_names: dict[int, str]):
        import numpy as np

        self.root = root
        self._rel = np.array([p.encode("utf-8") for p in rel_paths], dtype=np.bytes_)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self._sha = np.frombuffer(b"".join(bytes.fromhex(h) for h in sha256),
                                  dtype=np.uint8).reshape(len(rel_paths), 32)
        self.gzip_blocks = np.asarray(gzip_blocks, dtype=np.int32)
        self.indexed = indexed
        self.version = 3 if indexed else 1   # set by load_manifest (2 or 3 when indexed)
        self.listed_index_sizes: dict[int, int] = {}   # version 2: index sizes as listed
        self._index_names = index_names   # version 2 entries whose index is not the default
        self.missing: dict[int, str] = {}   # shard -> why (load_manifest, on_missing="skip")
        self.damaged: dict[int, str] = {}
        # [shard, 0: shard / 1: index] -> FileVersion.digest() at the start-up check (0: none)
        self.versions = np.zeros((len(rel_paths), 2), dtype=np.uint64)

    def __len__(self) -> int:
        return len(self.counts)

    def rel_path(self, i: int) -> str:
        """Shard ``i``'s path relative to the manifest."""
        return self._rel[i].decode("utf-8")

    def path(self, i: int) -> str:
        """Shard ``i``'s absolute path or URL."""
        return join(self.root, self.rel_path(i))

    def sha256(self, i: int) -> str:
        """Shard ``i``'s sha256 as the manifest lists it (hex)."""
        return self._sha[i].tobytes().hex()

    def index(self, i: int) -> str | None:
        """Absolute path of shard ``i``'s index, or ``None`` (version 1: no index)."""
        if not self.indexed:
            return None
        name = self._index_names.get(i) or index_path(self.rel_path(i))
        return join(self.root, name)

    def index_size(self, i: int) -> int | None:
        """Size of shard ``i``'s index file when the manifest fixes it (version 3)."""
        if not self.indexed or i in self._index_names or self.version != 3:
            return None
        return index_bytes(int(self.counts[i]), int(self.gzip_blocks[i]) or None)

    def __eq__(self, other) -> bool:
        if not isinstance(other, (ShardTable, list)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None   # mutable (missing/damaged), like a list

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        entry = {"path": self.path(i), "num_samples": int(self.counts[i]),
                 "bytes": int(self.sizes[i]), "sha256": self.sha256(i),
                 "index": self.index(i)}
        if self.gzip_blocks[i]:
            entry["gzip_block"] = int(self.gzip_blocks[i])
        if i in self.missing:
            entry["missing"] = self.missing[i]
        if i in self.damaged:
            entry["damaged"] = self.damaged[i]
        return entry


def load_manifest(path: str, *, verify_checksums: bool = False, on_missing: str = "raise",
                  check_files: bool = True, storage: Storage | None = None,
                  storage_options: dict | None = None) -> dict:
    """Read and validate a shard manifest, and check that every shard and index is there.

    Args:
        path: the ``manifest.json`` file or the folder holding it: a local path or a URL
            (``s3://bucket/clicks/v3/manifest.json``; a URL not ending in ``.json`` is a
            folder).
        verify_checksums: also re-hash every shard and compare with its ``sha256``
            (reads all the data; sizes are always checked).
        on_missing: ``"raise"``: a missing or wrong-sized shard (or index) is a
            ``DataError``; ``"skip"``: the shard is kept (its samples keep their places in
            the epoch order, so every rank still agrees on the batch count) and recorded in
            ``shards.missing`` (readers count its samples as bad), or, when the file and its
            index exist but the size or checksum differs, in ``shards.damaged`` (readers read
            what is there and count the samples that fail).
        check_files: False: read and validate the manifest only, touching no shard (a rank
            that receives another rank's check; see ``check_shard_files``).
        storage: where to read from (its retries and counters); default: a new ``Storage``
            with ``storage_options``.
        storage_options: fsspec options for URLs (``data.storage_options``).

    Returns:
        The manifest dict with ``"shards"`` as a ``ShardTable`` (compact; ``shards[i]`` is
        the shard's dict with absolute ``"path"`` and ``"index"``), plus ``"path"`` (the
        absolute manifest file or URL, for messages), ``"root"`` (its folder) and
        ``"on_missing"`` (the policy the files were checked under, None when not checked).
        Versions 1 (no index: readers scan the tar) and 2 (index listed per shard) load too.

    Raises:
        DataError: missing/invalid manifest (or bucket), unknown format or version, or
            (``on_missing="raise"``) a shard that is missing or whose size (or checksum)
            differs from the manifest, naming the shard.
    """
    if on_missing not in ("raise", "skip"):
        raise DataError(f"on_missing must be 'raise' or 'skip', got {short_repr(on_missing)}")
    storage = storage or Storage(storage_options)
    manifest_path, manifest = read_manifest_json(os.fspath(path), storage, compact=True)
    check = _ManifestCheck(manifest_path, manifest)
    table = check.shard_table(manifest["shards"])
    if check_files:
        apply_file_check(table, check_shard_files(table, storage, verify_checksums), on_missing,
                         manifest_path)
    return {**manifest, "shards": table, "path": manifest_path, "root": check.root,
            "on_missing": on_missing if check_files else None}


def manifest_file(path: str) -> str:
    """The manifest file a path names: itself, or ``manifest.json`` in the folder it names."""
    if is_url(path):
        return path if path.endswith(".json") else join(path.rstrip("/"), MANIFEST_NAME)
    path = os.path.abspath(path)
    return os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path


def read_manifest_json(path: str, storage: Storage, compact: bool = False) -> tuple[str, Any]:
    """``(manifest file, its parsed JSON)`` for a manifest file or the folder holding it
    (with ``compact``, shard entries come back as tuples: ``_compact_shard``).

    Raises:
        DataError: one line naming the file: missing (or its bucket), unreadable, not JSON.
    """
    manifest_path = manifest_file(path)
    folder = not is_url(path) and os.path.isdir(path)
    try:
        raw = storage.read_bytes(manifest_path)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        if "bucket" in str(exc).lower():   # the store's own words: the bucket, not the file, is missing
            raise DataError(f"no such file: {exc.strerror or exc.args[0]}", source=manifest_path) from None
        raise DataError("no such file" if not folder else
                        f"no {MANIFEST_NAME} (not a shard directory, or still being written)",
                        source=manifest_path if not folder else path) from None
    except DataError:
        raise
    except Exception as exc:   # noqa: BLE001 - permission, bucket, network (after retries)
        raise DataError(f"cannot read ({describe_failure(exc)})", source=manifest_path) from None
    try:
        return manifest_path, json.loads(raw.decode("utf-8"),
                                         object_hook=_compact_shard if compact else None)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"not valid JSON ({exc})", source=manifest_path) from None


class _ManifestCheck:
    """The checks of ``load_manifest`` on a parsed manifest: its top-level fields when
    built, then every shard entry and the shard and index files (``shard_table``)."""

    def __init__(self, manifest_path: str, manifest: Any):
        self.manifest_path = manifest_path
        self.root = parent(manifest_path)
        self.version, self.num_samples, self.top_gzip_block = self._header(manifest)

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(message, source=self.manifest_path, field=field)

    def _header(self, manifest: Any) -> tuple[int, int, int | None]:
        """``(version, num_samples, gzip_block)`` of a manifest whose top level is valid."""
        bad = self.error
        if not isinstance(manifest, dict):
            raise bad("not a JSON object")
        if manifest.get("format") != FORMAT:
            raise bad(f"not a clicktower shard manifest: format "
                      f"{short_repr(manifest.get('format'))}, expected {FORMAT!r}", "format")
        version = manifest.get("version")
        if version not in READ_VERSIONS:
            raise bad(f"unsupported version {short_repr(version)}; this clicktower reads "
                      f"versions {', '.join(map(str, READ_VERSIONS))} (re-shard the data with "
                      f"this version's clicktower shard)", "version")
        fields = manifest.get("fields")
        if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
            raise bad("must be a list of field names", "fields")
        missing = [f for f in REQUIRED_FIELDS if f not in fields]
        if missing:
            raise bad(f"lacks {', '.join(map(repr, missing))}", "fields")
        shards = manifest.get("shards")
        if not isinstance(shards, list) or not shards:
            raise bad("must be a non-empty list", "shards")
        num_samples = manifest.get("num_samples")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise bad(f"must be a positive integer, got {short_repr(num_samples)}", "num_samples")
        top_gzip_block = manifest.get("gzip_block") if version >= 3 else None
        if top_gzip_block is not None and (isinstance(top_gzip_block, bool) or not isinstance(
                top_gzip_block, int) or top_gzip_block < 1):
            raise bad(f"must be a positive integer, got {short_repr(top_gzip_block)}",
                      "gzip_block")
        return version, num_samples, top_gzip_block

    def _entry(self, i: int, shard: Any) -> tuple:
        """Shard entry ``i`` checked: ``(path, num_samples, bytes, sha256, index,
        index_bytes, gzip_block)`` (index and index_bytes as listed, version 2 only)."""
        where = f"shards[{i}]"
        if not isinstance(shard, tuple):
            raise self.error("must be an object with path, num_samples, bytes and sha256", where)
        rel, count, size, sha, index, idx_bytes, gzip_block = shard
        if not isinstance(rel, str) or not rel or os.path.isabs(rel) or is_url(rel):
            raise self.error(f"path must be relative to the manifest, got {short_repr(rel)}",
                             where)
        for key, value in (("num_samples", count), ("bytes", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise self.error(f"{key} must be a non-negative integer, got "
                                 f"{short_repr(value)}", where)
        if not isinstance(sha, str) or not _SHA256_RE.match(sha):
            raise self.error(f"sha256 must be 64 hex digits, got {short_repr(sha)}", where)
        if self.version >= 3:
            gzip_block = self.top_gzip_block if rel.endswith(".tar.gz") else None
            if rel.endswith(".tar.gz") and not gzip_block:
                raise self.error("a .tar.gz shard needs the manifest's gzip_block", where)
        return rel, count, size, sha, index, idx_bytes, gzip_block

    def shard_table(self, shards: list) -> ShardTable:
        """The checked shard entries as a ``ShardTable`` (no file is touched).

        Args:
            shards: the manifest's shard entries (tuples, from ``_compact_shard``).
        """
        rels, counts, sizes, shas, gzip_blocks = [], [], [], [], []
        index_names: dict[int, str] = {}
        index_sizes: dict[int, int] = {}
        seen_paths: set[str] = set()
        for i, shard in enumerate(shards):
            rel, count, size, sha, index, idx_bytes, gzip_block = self._entry(i, shard)
            target = join(self.root, rel)
            if target in seen_paths:   # the same samples twice in one epoch
                raise self.error(f"shard {rel!r} is listed twice", f"shards[{i}]")
            seen_paths.add(target)
            rels.append(rel)
            counts.append(count)
            sizes.append(size)
            shas.append(sha)
            gzip_blocks.append(gzip_block or 0)
            if self.version == 2:
                idx_rel = index if isinstance(index, str) else index_path(rel)
                if idx_rel != index_path(rel):
                    index_names[i] = idx_rel
                index_sizes[i] = idx_bytes
        total = sum(counts)
        if total != self.num_samples:
            raise self.error(f"is {self.num_samples} but the shards hold {total}", "num_samples")
        table = ShardTable(self.root, rels, counts, sizes, shas, gzip_blocks, self.version >= 2,
                           index_names)
        table.version, table.listed_index_sizes = self.version, index_sizes
        return table


def check_shard_files(table: ShardTable, storage: Storage, verify_checksums: bool = False) -> dict[str, Any]:
    """What is wrong with a table's shard and index files: ``{"missing": {shard: why},
    "damaged": {shard: why}, "versions": array}`` (damaged: the shard and its index are there
    but a size or the checksum differs; the readers read what is there; versions: [shards, 2]
    ``FileVersion.digest()`` of each shard's and index's version tag where the listing gives
    one, S3 ETags, else 0). Small and picklable, so one rank can check and broadcast it.

    Args:
        table: from ``load_manifest(..., check_files=False)``.
        storage: where to look (counts its metadata calls).
        verify_checksums: also re-hash every shard.
    """
    import numpy as np

    listings: dict[str, dict[str, FileVersion] | None] = {}
    # The objects' versions now (16 bytes a shard): a reader finding another one refuses it.
    versions = np.zeros((len(table), 2), dtype=np.uint64)
    out: dict[str, Any] = {"missing": {}, "damaged": {}, "versions": versions}

    def size_of(path: str, i: int, kind: int) -> int | None:
        folder = parent(path)
        if folder not in listings:
            listings[folder] = storage.list_versions(folder)
        listing = listings[folder]
        if listing is not None:
            found = listing.get(basename(path))
            if found is not None:
                versions[i, kind] = found.digest()
            return None if found is None else found.size
        try:
            return storage.size(path)
        except (FileNotFoundError, NotADirectoryError):
            return None

    for i in range(len(table)):
        rel, path = table.rel_path(i), table.path(i)
        size = int(table.sizes[i])
        got = size_of(path, i, 0)
        problem = None
        if got is None:
            problem = f"shard {rel!r} is missing ({path})"
        elif got != size:
            problem = (f"shard {rel!r} has {got} bytes, the manifest lists {size} "
                       f"(truncated or modified)")
        elif verify_checksums and sha256_of(path, storage) != table.sha256(i):
            problem = f"shard {rel!r}: sha256 differs from the manifest (corrupted or modified)"
        index = table.index(i)
        index_there = True
        if index is not None:
            want = table.listed_index_sizes.get(i) if table.version == 2 else table.index_size(i)
            idx_got = size_of(index, i, 1)
            idx_rel = index[len(table.root):].lstrip("/") if index.startswith(table.root) else index
            index_there = idx_got is not None
            if problem is None and idx_got is None:
                problem = f"index {idx_rel!r} of shard {rel!r} is missing ({index})"
            elif problem is None and idx_got != want:
                problem = f"index {idx_rel!r} of shard {rel!r} has {idx_got} bytes, expected {want}"
        if problem is not None:
            # Wrong size or checksum with both files there: read what is there; the samples
            # that are not come back bad one by one (truncated, corrupt...).
            damaged = got is not None and index is not None and index_there
            out["damaged" if damaged else "missing"][i] = problem
    return out


def apply_file_check(table: ShardTable, found: dict[str, Any], on_missing: str,
                     manifest_path: str) -> None:
    """Record ``check_shard_files``' findings in ``table`` (``on_missing="skip"``) or raise
    the first in shard order as a ``DataError`` (``"raise"``)."""
    problems = {**found["missing"], **found["damaged"]}
    if problems and on_missing == "raise":
        raise DataError(problems[min(problems)], source=manifest_path)
    table.missing.update(found["missing"])
    table.damaged.update(found["damaged"])
    if "versions" in found:
        table.versions = found["versions"]
