"""Write click pairs into indexed WebDataset tar shards with a manifest, and read them back.

Layout of a shard directory::

    out_dir/
      manifest.json              # written last; its presence means "complete"
      shard-000000.tar           # or .tar.gz with --gzip
      shard-000000.idx.npy       # per-sample byte offsets (the index), a sidecar per shard
      shard-000001.tar
      ...

A shard is a plain WebDataset tar: each sample is ``<key>.json`` (the sample dict from
``clicktower.data.sources.to_sample``) plus ``<key>.npy`` when it carries a feature vector;
``tar tf`` and ``wds.WebDataset`` read it as is. Members are written with the standard
library's ``TarInfo`` one sample at a time (rather than ``wds.TarWriter``, whose ``tarfile``
stream buffers 10 KiB records) so that the byte offset of every sample is known exactly.

The index (``.idx.npy``, uint64) holds ``num_samples + 1`` offsets into the uncompressed tar:
sample ``i`` is the bytes ``[off[i], off[i+1])``, so a reader seeks straight to any sample.
A ``.tar.gz`` shard is one gzip stream full-flushed every ``gzip_block`` samples; its index
appends the ``num_blocks + 1`` compressed offsets of those flush points, so a reader inflates
one block (raw deflate from a flush point), never the whole shard. The manifest (version 3)
lists per shard only its path, sample count, bytes and sha256: the index's name and size
follow from them, and readers load an index (memory-mapped) only when they open its shard.
``load_manifest`` keeps the shards as a compact ``ShardTable`` (arrays, about 80 bytes a
shard), so a reader's memory does not grow with the shard count by more than that.
Versions 1 (no index) and 2 (index name and size listed per shard) still load.

The key is ``SSSSS-RRRRRRRRRRRR``: the input's index in ``inputs`` and the record's row
(JSONL: line) number in it. It is unique, and stable whatever the shard size, the writer
count or the ranges (a range knows the line or row where it starts).

Parallel writing: the inputs are cut into ranges of about ``split_bytes`` (64 MiB):
uncompressed JSONL into byte ranges at line boundaries, uncompressed CSV/TSV at record
boundaries (found by one csv parse in the parent: a quoted field may span lines), Parquet
into runs of row groups, other inputs (gzip, datasets folders) whole, small inputs packed
together (``sources.split_input``). ``N`` writer processes take the ranges in turn and each reads only
its own ranges, so every input record is read and parsed once. Inside a range, records are
cut into chunks of ``shard_size`` (counted before the label filter), each chunk into parts
when ``max_shard_bytes`` is set; once all writers are done the shards are renamed
``shard-<n>`` in input order. The ranges do not depend on ``N``, so the output is
byte-identical for any number of writers.

Crash safety: everything is written into a sibling ``out_dir.tmp-<pid>`` directory that is
renamed to ``out_dir`` only after the manifest is on disk, so an ``out_dir`` that exists is
complete; on any error the temporary directory is removed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import zlib
from collections.abc import Sequence
from typing import Any, Iterator

from clicktower.data.errors import DataError, short_repr
from clicktower.data.sources import (FieldMap, check_fields, iter_records, split_input,
                                     to_sample)

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "VERSION",
    "SampleError",
    "ShardTable",
    "decode_sample_bytes",
    "index_path",
    "iter_shard",
    "load_manifest",
    "sample_key",
    "write_shards",
]

FORMAT = "clicktower.clickpairs"
VERSION = 3
# version 1: no index (readers scan the tar); 2: index name and size listed per shard
READ_VERSIONS = (1, 2, 3)
MANIFEST_NAME = "manifest.json"
INDEX_SUFFIX = ".idx.npy"
_REQUIRED_FIELDS = ("query", "item_id", "item_text")
# Fixed member mtime: the same inputs give byte-identical shards, hence identical sha256.
_TAR_MTIME = 0
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_TAR_BLOCK = 512
DEFAULT_GZIP_BLOCK = 64
_GZIP_HEADER_BYTES = 10   # zlib's gzip header: no name, no extra fields
_NPY_HEADER = 128
DEFAULT_SPLIT_BYTES = 64 * 1024 * 1024


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


def sample_key(source_index: int, row: int) -> str:
    """The ``__key__`` of the sample from row ``row`` of input number ``source_index``.

    Keys contain no dot: WebDataset splits member names at the first dot of the basename.
    """
    return f"{source_index:05d}-{row:012d}"


# --------------------------------------------------------------------------------------
# Sample <-> tar bytes
# --------------------------------------------------------------------------------------

def _tar_member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o444
    info.uname = info.gname = "bigdata"   # what wds.TarWriter writes
    header = info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")
    return header + data + b"\0" * (-len(data) % _TAR_BLOCK)


def _encode_sample(key: str, sample: dict) -> bytes:
    """Sample dict -> the tar bytes of its members. The one place to add members."""
    sample = dict(sample)
    features = sample.pop("features", None)
    data = json.dumps(sample, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    out = _tar_member(f"{key}.json", data)
    if features is not None:
        import numpy as np

        buf = io.BytesIO()
        np.save(buf, np.asarray(features, dtype=np.float32), allow_pickle=False)
        out += _tar_member(f"{key}.npy", buf.getvalue())
    return out


class SampleError(Exception):
    """One bad sample: ``reason`` (a counter name) and a message; the loader adds the shard."""

    def __init__(self, reason: str, message: str, key: str | None = None):
        super().__init__(message)
        self.reason, self.message, self.key = reason, message, key


def split_members(buf: bytes) -> tuple[str | None, dict[str, bytes]]:
    """Parse the tar members of one sample (``[off[i], off[i+1])`` of a shard).

    Returns:
        ``(key, {extension: bytes})``.

    Raises:
        SampleError: ``truncated`` (cut short) or ``corrupt_tar`` (bad header, mixed keys).
    """
    key, members, pos, end = None, {}, 0, len(buf)
    while pos < end:
        header = buf[pos:pos + _TAR_BLOCK]
        if len(header) < _TAR_BLOCK:
            raise SampleError("truncated", "tar header cut short", key)
        if header.count(0) == _TAR_BLOCK:   # end-of-archive blocks
            break
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise SampleError("corrupt_tar", f"bad tar header ({exc})", key) from None
        pos += _TAR_BLOCK
        data = buf[pos:pos + info.size]
        if len(data) < info.size:
            raise SampleError("truncated", f"member {info.name!r} cut short", key)
        pos += info.size + (-info.size % _TAR_BLOCK)
        if not info.isfile():
            continue
        base = os.path.basename(info.name)
        stem, _, ext = base.partition(".")
        if key is None:
            key = stem
        elif stem != key:
            raise SampleError("corrupt_tar", f"member {info.name!r} inside sample {key!r}", key)
        members[ext] = bytes(data)
    return key, members


def decode_sample_bytes(members: dict[str, bytes], key: str | None,
                        max_text_chars: int | None = None) -> dict:
    """Members of one sample -> the sample dict (with ``__key__``), validated for training.

    Raises:
        SampleError: ``invalid_utf8``, ``invalid_json``, ``missing_field``, ``empty_text``,
            ``text_too_long`` or ``bad_features``.
    """
    raw = members.get("json")
    if raw is None:
        raise SampleError("missing_field", "no .json member", key)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleError("invalid_utf8", f"invalid UTF-8 at byte {exc.start}", key) from None
    try:
        sample = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SampleError("invalid_json", f"invalid JSON ({exc.msg} at column {exc.colno})",
                          key) from None
    if not isinstance(sample, dict):
        raise SampleError("invalid_json", "JSON member is not an object", key)
    for field in _REQUIRED_FIELDS:
        value = sample.get(field)
        if value is None:
            raise SampleError("missing_field", f"field {field!r} missing", key)
        if not isinstance(value, str):
            if field == "item_id" and isinstance(value, int) and not isinstance(value, bool):
                value = sample[field] = str(value)
            else:
                raise SampleError("missing_field", f"field {field!r} is not text", key)
        if not value.strip():
            raise SampleError("empty_text", f"field {field!r} is empty", key)
        if max_text_chars is not None and len(value) > max_text_chars:
            raise SampleError("text_too_long", f"field {field!r} has {len(value)} characters "
                              f"(limit {max_text_chars})", key)
    if "npy" in members:
        import numpy as np

        try:
            sample["features"] = np.load(io.BytesIO(members["npy"]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise SampleError("bad_features", f"unreadable .npy member ({exc})", key) from None
    sample["__key__"] = key
    return sample


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------

class _ShardFile:
    """One shard (``.tar`` or ``.tar.gz``) and its index, hashed as it is written.

    A ``.tar.gz`` shard is one ordinary gzip stream (``tar xzf``, ``gzip -d``, tarfile and
    ``wds.WebDataset`` read it), flushed with ``Z_FULL_FLUSH`` after every ``gzip_block``
    samples: a full flush byte-aligns the deflate stream and forgets the history, so raw
    inflate can start at any recorded block offset (the idea of indexed gzip / BGZF).
    """

    def __init__(self, directory: str, name: str, gzip_block: int | None):
        self.directory, self.name = directory, name
        self.gzip_block = gzip_block
        self.fh = open(os.path.join(directory, name), "wb")
        self.sha256 = hashlib.sha256()
        self.bytes = 0            # file bytes written (compressed for .tar.gz)
        self.tar_bytes = 0        # uncompressed tar bytes
        self.offsets = [0]        # sample i = tar bytes [offsets[i], offsets[i+1])
        self.blocks: list[int] = []   # .tar.gz: compressed offset where each block starts
        self._pending: list[bytes] = []
        self._comp = None
        if gzip_block is not None:
            self._comp = zlib.compressobj(6, zlib.DEFLATED, 31)

    def _write(self, data: bytes):
        if data:
            self.fh.write(data)
            self.sha256.update(data)
            self.bytes += len(data)

    def _flush_block(self):
        data = b"".join(self._pending)
        self._pending = []
        out = self._comp.compress(data) + self._comp.flush(zlib.Z_FULL_FLUSH)
        if not self.blocks:   # the gzip header (written with the first output) comes first
            self.blocks.append(self.bytes + _GZIP_HEADER_BYTES)
        self._write(out)
        self.blocks.append(self.bytes)

    def add(self, data: bytes):
        self.tar_bytes += len(data)
        self.offsets.append(self.tar_bytes)
        if self.gzip_block is None:
            self._write(data)
            return
        self._pending.append(data)
        if self.num_samples % self.gzip_block == 0:
            self._flush_block()

    @property
    def num_samples(self) -> int:
        return len(self.offsets) - 1

    def close(self) -> dict:
        import numpy as np

        end = b"\0" * (2 * _TAR_BLOCK)   # tar end-of-archive
        if self.gzip_block is None:
            self._write(end)
        else:
            if self._pending:
                self._flush_block()
            self._write(self._comp.compress(end) + self._comp.flush(zlib.Z_FINISH))
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        index = self.offsets + self.blocks
        idx_name = index_path(self.name)
        np.save(os.path.join(self.directory, idx_name), np.asarray(index, dtype=np.uint64),
                allow_pickle=False)
        # The manifest does not list the index: its name and size follow from the shard's
        # (index_path, index_bytes), which keeps the manifest at four fields per shard.
        got = os.path.getsize(os.path.join(self.directory, idx_name))
        want = index_bytes(self.num_samples, self.gzip_block)
        if got != want:   # pragma: no cover - a numpy whose .npy header is not 128 bytes
            raise RuntimeError(f"index {idx_name} has {got} bytes, expected {want}")
        return {"path": self.name, "num_samples": self.num_samples, "bytes": self.bytes,
                "sha256": self.sha256.hexdigest()}

    def abort(self):
        self.fh.close()


class _ChunkWriter:
    """Writes the shards of one chunk, starting a new part when ``max_bytes`` would be passed.
    Parts are opened lazily, so no empty shard is ever written."""

    def __init__(self, directory: str, stem: str, max_bytes: int | None,
                 gzip_block: int | None):
        self.directory, self.stem, self.max_bytes = directory, stem, max_bytes
        self.gzip_block = gzip_block
        self.shards: list[dict] = []
        self._file: _ShardFile | None = None

    def add(self, data: bytes):
        f = self._file
        if (f is not None and self.max_bytes is not None and f.num_samples
                and f.tar_bytes + len(data) + 2 * _TAR_BLOCK > self.max_bytes):
            self.shards.append(f.close())
            f = self._file = None
        if f is None:
            name = (f"{self.stem}-{len(self.shards):03d}"
                    + (".tar.gz" if self.gzip_block is not None else ".tar"))
            f = self._file = _ShardFile(self.directory, name, self.gzip_block)
        f.add(data)

    def close(self) -> list[dict]:
        if self._file is not None:
            self.shards.append(self._file.close())
            self._file = None
        return self.shards

    def abort(self):
        if self._file is not None:
            self._file.abort()
            self._file = None


def _write_part(job: dict) -> dict:
    """Write the shards of one range of the inputs (a list of input parts, see
    ``_plan_ranges``): chunks of ``shard_size`` records counted from the range's start, under
    temporary names ``part-<range>-<chunk>-<part>`` that ``write_shards`` renames. Reads only
    its own parts. Module-level so that it pickles into a spawned process."""
    directory, field_map = job["directory"], FieldMap(**job["field_map"])
    shard_size = job["shard_size"]
    shards: list[dict] = []
    num_rows = num_filtered = num_samples = 0
    writer: _ChunkWriter | None = None
    chunk = -1
    try:
        for seg in job["segments"]:
            path = seg["path"]
            for row, record in iter_records(path, part=seg["part"]):
                if num_rows // shard_size != chunk:
                    chunk = num_rows // shard_size
                    if writer is not None:
                        shards += writer.close()
                    writer = _ChunkWriter(directory, f"part-{job['range']:06d}-{chunk:06d}",
                                          job["max_shard_bytes"],
                                          job["gzip_block"] if job["gzip"] else None)
                num_rows += 1
                sample = to_sample(record, field_map, source=path, row=row)
                if sample is None:
                    num_filtered += 1
                    continue
                writer.add(_encode_sample(sample_key(seg["source"], row), sample))
                num_samples += 1
        if writer is not None:
            shards += writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return {"shards": shards, "num_rows": num_rows, "num_filtered": num_filtered,
            "num_samples": num_samples}


def _plan_ranges(inputs: list[str], split_bytes: int) -> list[list[dict]]:
    """The inputs as ranges of about ``split_bytes``: each a list of consecutive input parts
    (``sources.split_input``), small inputs packed together, so that N writers share the
    work without any of them reading another's records, and the plan (hence every shard)
    does not depend on the number of writers."""
    ranges: list[list[dict]] = []
    current: list[dict] = []
    size = 0
    for source, path in enumerate(inputs):
        for piece in split_input(path, split_bytes):
            if current and size + piece["bytes"] > split_bytes:
                ranges.append(current)
                current, size = [], 0
            current.append({"source": source, "path": path, "part": piece["part"]})
            size += piece["bytes"]
    if current:
        ranges.append(current)
    return ranges


def _run_parts(jobs: list[dict], workers: int) -> list[dict]:
    if workers == 1 or len(jobs) == 1:
        return [_write_part(job) for job in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the caller may hold threads (tokenizers, torch) that fork would copy
    # mid-lock; clicktower.data imports lazily, so a spawned writer starts in well under 1 s.
    # ProcessPoolExecutor, not Pool: a writer that dies raises BrokenProcessPool here
    # instead of being replaced forever.
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_write_part, job) for job in jobs]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()   # the other writers would only write shards to delete
            raise


def expand_inputs(patterns: list[str]) -> list[str]:
    """Expand shell-style globs (``logs/2024-*/part-*.jsonl.gz``) that name no existing
    path into sorted file lists; other paths pass through unchanged.

    Raises:
        DataError: a glob that matches nothing.
    """
    import glob

    out = []
    for pattern in patterns:
        if not os.path.exists(pattern) and glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError("no files match this pattern", source=pattern)
            out += matches
        else:
            out.append(pattern)
    return out


def write_shards(inputs: list[str], out_dir: str, field_map: FieldMap, *,
                 shard_size: int = 100_000, overwrite: bool = False, workers: int = 1,
                 max_shard_bytes: int | None = None, gzip: bool = False,
                 gzip_block: int = DEFAULT_GZIP_BLOCK,
                 split_bytes: int = DEFAULT_SPLIT_BYTES) -> dict:
    """Convert click-log inputs into indexed WebDataset tar shards plus ``manifest.json``.

    Args:
        inputs: input files/folders (any format ``sources.iter_records`` reads) or globs,
            written in this order.
        out_dir: output directory; created (with parents). It appears only once complete.
        field_map: which input fields make up a sample, and the ``min_label`` filter.
        shard_size: input records per chunk; a shard holds at most this many samples
            (fewer when the label filter drops rows, or ``max_shard_bytes`` cuts the chunk).
        overwrite: replace an existing, non-empty ``out_dir`` (only a previous shard
            directory is ever replaced).
        workers: writer processes; they share the ranges of the inputs (see
            ``split_bytes``) and each reads only its own.
        max_shard_bytes: also start a new shard (part) before a shard's uncompressed tar
            would pass this many bytes.
        gzip: write ``.tar.gz`` shards (one gzip member per ``gzip_block`` samples).
        gzip_block: samples per gzip member: a reader decompresses this many to get one.
        split_bytes: the inputs are cut into ranges of about this many bytes (uncompressed
            JSONL at line boundaries, CSV/TSV at record boundaries, Parquet at row groups;
            gzip inputs and datasets folders whole, small inputs packed together) that
            writers take in turn. No shard spans two ranges, so this also bounds a shard
            (about ``split_bytes`` of input); the ranges, hence the shards, do not depend
            on ``workers``.

    Returns:
        The manifest, as written: ``{"format", "version", "num_samples", "fields",
        "shards": [{"path", "num_samples", "bytes", "sha256"}], "sources", "field_map",
        "num_filtered", "shard_size", "max_shard_bytes", "gzip", "gzip_block",
        "split_bytes", "num_ranges"}`` with paths relative to ``out_dir``.

    Raises:
        DataError: bad arguments, existing output without ``overwrite``, any bad input
            (see ``sources``), or no samples at all. Nothing is left behind on error.
    """
    inputs = _checked_inputs(inputs, field_map)
    _check_sizes({"shard size": shard_size, "workers": workers, "gzip block": gzip_block,
                  "split bytes": split_bytes}, max_shard_bytes)
    out_dir = os.fspath(out_dir)
    out_dir = out_dir.rstrip(os.sep) or out_dir

    _check_out_dir(out_dir, inputs, overwrite)
    # Fail fast: every input exists, is readable and has the mapped fields before any shard
    # is written (a missing column in the last input should not cost a pass over the first).
    for path in inputs:
        check_fields(path, field_map)

    tmp_dir = _fresh_tmp_dir(out_dir)
    try:
        ranges = _plan_ranges(inputs, split_bytes)
        jobs = [{"range": r, "segments": segments, "directory": tmp_dir,
                 "field_map": field_map.to_dict(), "shard_size": shard_size,
                 "max_shard_bytes": max_shard_bytes, "gzip": gzip, "gzip_block": gzip_block}
                for r, segments in enumerate(ranges)]
        parts = _run_parts(jobs, workers)
        settings = {"shard_size": shard_size, "max_shard_bytes": max_shard_bytes, "gzip": gzip,
                    "gzip_block": gzip_block if gzip else None, "split_bytes": split_bytes,
                    "num_ranges": len(ranges)}
        manifest = _manifest(inputs, field_map, parts, _number_shards(tmp_dir, parts, gzip),
                             settings)
        _write_json_durably(os.path.join(tmp_dir, MANIFEST_NAME), manifest)
        _fsync_dir(tmp_dir)
        _install(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


def _checked_inputs(inputs: list[str], field_map: FieldMap) -> list[str]:
    """``write_shards``' inputs with globs expanded, after checking the argument types."""
    if isinstance(inputs, (str, bytes, os.PathLike)) or not inputs:
        raise DataError("write_shards: inputs must be a non-empty list of paths")
    inputs = expand_inputs([os.fspath(p) for p in inputs])
    if not isinstance(field_map, FieldMap):
        raise DataError(f"write_shards: field_map must be a FieldMap, got "
                        f"{type(field_map).__name__}")
    return inputs


def _check_sizes(positive: dict[str, int], max_shard_bytes: int | None) -> None:
    """Raise a DataError unless every value of ``positive`` (by its name in messages) is a
    positive integer and ``max_shard_bytes`` is None or an integer of at least 4 tar blocks."""
    for name, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {short_repr(value)}")
    if max_shard_bytes is not None and (isinstance(max_shard_bytes, bool) or not isinstance(
            max_shard_bytes, int) or max_shard_bytes < 4 * _TAR_BLOCK):
        raise DataError(f"max shard bytes must be an integer >= {4 * _TAR_BLOCK}, "
                        f"got {short_repr(max_shard_bytes)}")


def _fresh_tmp_dir(out_dir: str) -> str:
    """Create the empty sibling ``out_dir.tmp-<pid>`` that the shards are written into."""
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    if os.path.lexists(tmp_dir):  # a leftover from a killed run whose pid we now reuse
        shutil.rmtree(tmp_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    os.mkdir(tmp_dir)
    return tmp_dir


def _number_shards(tmp_dir: str, parts: list[dict], gzip: bool) -> list[dict]:
    """The writers' shards renamed ``shard-<n>`` (and their indexes) in input order."""
    # Range order, then chunk, then part: the input order. Renamed to consecutive numbers
    # here, once every writer is done (a writer cannot know how many shards the ranges
    # before its own make).
    shards = [s for part in parts for s in part["shards"]]
    for number, shard in enumerate(shards):
        name = shard_name(number, gzip)
        os.rename(os.path.join(tmp_dir, shard["path"]), os.path.join(tmp_dir, name))
        os.rename(os.path.join(tmp_dir, index_path(shard["path"])),
                  os.path.join(tmp_dir, index_path(name)))
        shard["path"] = name
    return shards


def _manifest(inputs: list[str], field_map: FieldMap, parts: list[dict], shards: list[dict],
              settings: dict) -> dict:
    """The manifest of the written shards: counts, fields, shards, sources, then the
    writer ``settings``; a DataError when no sample was written."""
    num_samples = sum(s["num_samples"] for s in shards)
    num_rows = sum(p["num_rows"] for p in parts)
    num_filtered = sum(p["num_filtered"] for p in parts)
    if num_samples == 0:
        why = (f"all {num_rows} rows have {field_map.label} < {field_map.min_label:g}"
               if num_filtered else "no rows")
        raise DataError(f"no samples: {why}", source=", ".join(inputs))
    return {"format": FORMAT, "version": VERSION, "num_samples": num_samples,
            "fields": field_map.sample_fields(), "shards": shards, "sources": inputs,
            "field_map": field_map.to_dict(), "num_filtered": num_filtered, **settings}


def _write_json_durably(path: str, obj: dict) -> None:
    """Write ``obj`` as indented JSON and fsync the file."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _is_shard_dir(path: str) -> bool:
    try:
        with open(os.path.join(path, MANIFEST_NAME), encoding="utf-8") as fh:
            return json.load(fh).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out_dir(out_dir: str, inputs: list[str], overwrite: bool):
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise DataError("output path exists and is not a directory", source=out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise DataError("output directory exists and is not empty; "
                            "pass --overwrite to replace it", source=out_dir)
        # --overwrite deletes the old directory: only ever a previous shard output, never
        # a directory of other things that happens to be named by mistake.
        if not _is_shard_dir(out_dir):
            raise DataError(f"refusing to overwrite: not a clicktower shard directory "
                            f"(no {MANIFEST_NAME} of format {FORMAT!r})", source=out_dir)
        real_out = os.path.realpath(out_dir)
        for path in inputs:
            real = os.path.realpath(path.rsplit(":", 1)[0] if not os.path.exists(path) else path)
            if os.path.commonpath([real_out, real]) == real_out:
                raise DataError(f"refusing to overwrite: input {path!r} lies inside it",
                                source=out_dir)


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _install(tmp_dir: str, out_dir: str):
    """Atomically move the finished ``tmp_dir`` into place at ``out_dir``."""
    if not os.path.isdir(out_dir):
        os.rename(tmp_dir, out_dir)
    elif not os.listdir(out_dir):
        os.rmdir(out_dir)
        os.rename(tmp_dir, out_dir)
    else:  # --overwrite of a previous shard directory (checked by _check_out_dir)
        old = f"{out_dir}.old-{os.getpid()}"
        os.rename(out_dir, old)
        try:
            os.rename(tmp_dir, out_dir)
        except BaseException:
            os.rename(old, out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(os.path.dirname(os.path.abspath(out_dir)))




# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------

def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
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
        self._index_names = index_names   # version 2 entries whose index is not the default
        self.missing: dict[int, str] = {}   # shard -> why (load_manifest, on_missing="skip")
        self.damaged: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.counts)

    def rel_path(self, i: int) -> str:
        """Shard ``i``'s path relative to the manifest."""
        return self._rel[i].decode("utf-8")

    def path(self, i: int) -> str:
        """Shard ``i``'s absolute path."""
        return os.path.normpath(os.path.join(self.root, self.rel_path(i)))

    def index(self, i: int) -> str | None:
        """Absolute path of shard ``i``'s index, or ``None`` (version 1: no index)."""
        if not self.indexed:
            return None
        name = self._index_names.get(i) or index_path(self.rel_path(i))
        return os.path.normpath(os.path.join(self.root, name))

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
                 "bytes": int(self.sizes[i]), "sha256": self._sha[i].tobytes().hex(),
                 "index": self.index(i)}
        if self.gzip_blocks[i]:
            entry["gzip_block"] = int(self.gzip_blocks[i])
        if i in self.missing:
            entry["missing"] = self.missing[i]
        if i in self.damaged:
            entry["damaged"] = self.damaged[i]
        return entry


def load_manifest(path: str, *, verify_checksums: bool = False,
                  on_missing: str = "raise") -> dict:
    """Read and validate a shard manifest, and check that every shard and index is there.

    Args:
        path: the ``manifest.json`` file or the directory holding it.
        verify_checksums: also re-hash every shard and compare with its ``sha256``
            (reads all the data; sizes are always checked).
        on_missing: ``"raise"``: a missing, unreadable or wrong-sized shard (or index) is a
            ``DataError``; ``"skip"``: the shard is kept (its samples keep their places in
            the epoch order, so every rank still agrees on the batch count) and recorded in
            ``shards.missing`` (readers count its samples as bad), or, when the file and its
            index exist but the size or checksum differs, in ``shards.damaged`` (readers read
            what is there and count the samples that fail).

    Returns:
        The manifest dict with ``"shards"`` as a ``ShardTable`` (compact; ``shards[i]`` is
        the shard's dict with absolute ``"path"`` and ``"index"``), plus ``"path"`` (the
        absolute manifest file, for messages) and ``"root"`` (its directory). Versions 1
        (no index: readers scan the tar) and 2 (index listed per shard) load too.

    Raises:
        DataError: missing/invalid manifest, unknown format or version, or (``on_missing=
            "raise"``) a shard that is missing or whose size (or checksum) differs from the
            manifest, naming the shard.
    """
    if on_missing not in ("raise", "skip"):
        raise DataError(f"on_missing must be 'raise' or 'skip', got {short_repr(on_missing)}")
    manifest_path, manifest = _read_manifest_file(os.fspath(path))
    check = _ManifestCheck(manifest_path, manifest)
    table = check.shard_table(manifest["shards"], verify_checksums, on_missing)
    return {**manifest, "shards": table, "path": os.path.abspath(manifest_path),
            "root": check.root, "on_missing": on_missing}


def _read_manifest_file(path: str) -> tuple[str, Any]:
    """``(manifest file, its parsed JSON)`` for a manifest file or the directory holding it
    (shard entries come back as tuples: ``_compact_shard``)."""
    manifest_path = os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(manifest_path):
        raise DataError("no such file" if not os.path.isdir(path) else
                        f"no {MANIFEST_NAME} (not a shard directory, or still being written)",
                        source=manifest_path if not os.path.isdir(path) else path)
    try:
        with open(manifest_path, encoding="utf-8") as fh:
            return manifest_path, json.load(fh, object_hook=_compact_shard)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"not valid JSON ({exc})", source=manifest_path) from None


class _ManifestCheck:
    """The checks of ``load_manifest`` on a parsed manifest: its top-level fields when
    built, then every shard entry and the shard and index files (``shard_table``)."""

    def __init__(self, manifest_path: str, manifest: Any):
        self.manifest_path = manifest_path
        self.root = os.path.dirname(os.path.abspath(manifest_path))
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
        missing = [f for f in _REQUIRED_FIELDS if f not in fields]
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
        if not isinstance(rel, str) or not rel or os.path.isabs(rel):
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

    @staticmethod
    def _file_problem(abs_path: str, rel: str, size: int, sha: str,
                      verify_checksums: bool) -> str | None:
        """What is wrong with a shard file on disk, or None."""
        # One stat per file: the start-up check of many shards on a network filesystem.
        try:
            st_size = os.stat(abs_path).st_size
        except OSError:
            return f"shard {rel!r} is missing ({abs_path})"
        if not os.access(abs_path, os.R_OK):
            return f"shard {rel!r} is not readable ({abs_path})"
        if st_size != size:
            return (f"shard {rel!r} has {st_size} bytes, the manifest lists {size} "
                    f"(truncated or modified)")
        if verify_checksums and _sha256_file(abs_path) != sha:
            return f"shard {rel!r}: sha256 differs from the manifest (corrupted or modified)"
        return None

    def _index_problem(self, rel: str, idx_rel: str, want: int) -> str | None:
        """What is wrong with the index file of shard ``rel`` (``want`` bytes), or None."""
        idx = os.path.normpath(os.path.join(self.root, idx_rel))
        try:
            got = os.stat(idx).st_size
        except OSError:
            got = None
        if got is None or not os.access(idx, os.R_OK):
            return f"index {idx_rel!r} of shard {rel!r} is missing ({idx})"
        if got != want:
            return f"index {idx_rel!r} of shard {rel!r} has {got} bytes, expected {want}"
        return None

    def shard_table(self, shards: list, verify_checksums: bool, on_missing: str) -> ShardTable:
        """The checked shard entries as a ``ShardTable``, the missing and damaged shards
        recorded in it (``on_missing="skip"``) or raised (``"raise"``).

        Args:
            shards: the manifest's shard entries (tuples, from ``_compact_shard``).
            verify_checksums: also re-hash every shard.
            on_missing: ``"raise"`` or ``"skip"`` (see ``load_manifest``).
        """
        rels, counts, sizes, shas, gzip_blocks = [], [], [], [], []
        index_names: dict[int, str] = {}
        problems: dict[int, str] = {}
        seen_paths: set[str] = set()
        for i, shard in enumerate(shards):
            rel, count, size, sha, index, idx_bytes, gzip_block = self._entry(i, shard)
            abs_path = os.path.normpath(os.path.join(self.root, rel))
            if abs_path in seen_paths:   # the same samples twice in one epoch
                raise self.error(f"shard {rel!r} is listed twice", f"shards[{i}]")
            seen_paths.add(abs_path)
            rels.append(rel)
            counts.append(count)
            sizes.append(size)
            shas.append(sha)
            gzip_blocks.append(gzip_block or 0)
            problem = self._file_problem(abs_path, rel, size, sha, verify_checksums)
            if self.version >= 2:
                v2 = self.version == 2
                idx_rel = index if v2 and isinstance(index, str) else index_path(rel)
                if idx_rel != index_path(rel):
                    index_names[i] = idx_rel
                want = idx_bytes if v2 else index_bytes(count, gzip_block)
                problem = problem or self._index_problem(rel, idx_rel, want)
            if problem is not None:
                if on_missing == "raise":
                    raise self.error(problem)
                problems[i] = problem
        total = sum(counts)
        if total != self.num_samples:
            raise self.error(f"is {self.num_samples} but the shards hold {total}", "num_samples")
        table = ShardTable(self.root, rels, counts, sizes, shas, gzip_blocks, self.version >= 2,
                           index_names)
        for i, problem in problems.items():
            index = table.index(i)
            if os.path.isfile(table.path(i)) and index is not None and os.path.isfile(index):
                # Wrong size or checksum: read what is there; the samples that are not come
                # back bad one by one (truncated, corrupt...), the others are kept.
                table.damaged[i] = problem
            else:
                table.missing[i] = problem
        return table


def iter_shard(path: str) -> Iterator[dict]:
    """Yield the samples of one shard in file order, reading it from start to end.

    Args:
        path: a ``.tar`` or ``.tar.gz`` shard written by ``write_shards``.

    Yields:
        Each sample dict (as ``to_sample`` made it) with ``"__key__"`` added; a feature
        vector comes back as a numpy array under ``"features"``.

    Raises:
        DataError: unreadable tar, or a sample without a valid ``.json`` member.
    """
    import gzip

    from webdataset.tariterators import group_by_keys, tar_file_expander

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError("no such file", source=path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        members = group_by_keys(tar_file_expander([{"url": path, "stream": fh}]))
        try:
            for sample in members:
                key = sample.get("__key__")
                parts = {k: v for k, v in sample.items() if not k.startswith("__")}
                try:
                    yield decode_sample_bytes(parts, key)
                except SampleError as exc:
                    raise DataError(f"sample {key!r}: {exc.message}", source=path) from None
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DataError(f"not a readable tar shard ({exc.args[0] if exc.args else exc})",
                            source=path) from None
