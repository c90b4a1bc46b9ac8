"""Write click pairs into indexed WebDataset tar shards with a manifest, and read them back.

A shard set is a folder (or URL) of plain WebDataset tars (``shard-000000.tar`` or
``.tar.gz``; each sample a ``<key>.json`` member, plus ``<key>.npy`` for a feature vector),
a sidecar index per shard (``.idx.npy``: the byte offset of every sample, so a reader seeks
straight to one) and ``manifest.json``, written last (its presence means complete). Members
are written one at a time with the standard library's ``TarInfo`` rather than
``wds.TarWriter``, whose buffering hides each sample's offset. ``load_manifest`` keeps the
shard list as a compact ``ShardTable``; manifest versions 1 and 2 still load.

``write_shards`` cuts the inputs into ranges that ``N`` writer processes share, each reading
only its own, so the output is byte-identical for any ``N``. Format, keys, ranges and the
reasons: docs/data.md ("Sharding", "Shards at scale").
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import zlib
from collections import Counter
from typing import Any, Callable, Iterator

from clicktower.data import outputs
from clicktower.data.errors import DataError, short_repr
from clicktower.data.features import BadFeatures, check_vector, load_features_file
# The manifest's names stay importable from here (``clicktower.data.shards.load_manifest``).
from clicktower.data.manifest import (FORMAT, MANIFEST_NAME, REQUIRED_FIELDS, VERSION,  # noqa: F401
                                      ShardTable, index_bytes, index_path, load_manifest,
                                      shard_name)
from clicktower.data.sources import (FieldMap, check_fields, iter_records, split_input,
                                     to_sample)
from clicktower.data.storage import Storage, glob_urls, is_url

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

_REQUIRED_FIELDS = REQUIRED_FIELDS
# Fixed member mtime: the same inputs give byte-identical shards, hence identical sha256.
_TAR_MTIME = 0
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_TAR_BLOCK = 512
DEFAULT_GZIP_BLOCK = 64
_GZIP_HEADER_BYTES = 10   # zlib's gzip header: no name, no extra fields
_NPY_HEADER = 128
DEFAULT_SPLIT_BYTES = 64 * 1024 * 1024


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
                        max_text_chars: int | None = None, features_dim: int | None = None) -> dict:
    """Members of one sample -> the sample dict (with ``__key__``), validated for training.

    ``features_dim`` (the model's ``item_features_dim``) is the length every feature vector
    (the sample's and its hard negatives') must have; each must also be finite and numeric.

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
    _check_features(sample, key, features_dim)
    sample["__key__"] = key
    return sample


def _check_features(sample: dict, key: str | None, dim: int | None) -> None:
    """Check the sample's and its hard negatives' vectors (``bad_features``, the key and
    the offending vector named)."""
    entries = [("features", sample)]
    negatives = sample.get("hard_negatives")
    if isinstance(negatives, list):
        entries += [(f"hard_negatives[{i}].features", n) for i, n in enumerate(negatives)
                    if isinstance(n, dict)]
    for name, entry in entries:
        if entry.get("features") is None:
            continue
        try:
            entry["features"] = check_vector(entry["features"], dim)
        except BadFeatures as exc:
            raise SampleError("bad_features", f"{name}: {exc}", key) from None


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
    # Vectors kept apart (--features-file): each writer loads the id table (memory-mapped).
    vectors = load_features_file(*job["features_file"]) if job.get("features_file") else None
    shards: list[dict] = []
    num_rows = num_filtered = num_samples = 0
    items: Counter = Counter()
    queries: Counter = Counter()
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
                if vectors is not None:
                    _attach_vectors(sample, vectors)
                writer.add(_encode_sample(sample_key(seg["source"], row), sample))
                num_samples += 1
                items[str(sample["item_id"])] += 1
                queries[sample["query"]] += 1
        if writer is not None:
            shards += writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return {"shards": shards, "num_rows": num_rows, "num_filtered": num_filtered,
            "num_samples": num_samples, "popularity": {"items": dict(items), "queries": dict(queries)}}


def _plan_ranges(inputs: list[str], split_bytes: int, first_source: int = 0) -> list[list[dict]]:
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
            current.append({"source": first_source + source, "path": path, "part": piece["part"]})
            size += piece["bytes"]
    if current:
        ranges.append(current)
    return ranges


def _run_parts(jobs: list[dict], workers: int, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Write every range (``workers`` processes); ``progress(done, total)`` after each."""
    tick = progress or (lambda done, total: None)
    if workers == 1 or len(jobs) == 1:
        results = []
        for job in jobs:
            results.append(_write_part(job))
            tick(len(results), len(jobs))
        return results
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: the caller may hold threads (tokenizers, torch) that fork would copy
    # mid-lock; clicktower.data imports lazily, so a spawned writer starts in well under 1 s.
    # ProcessPoolExecutor, not Pool: a writer that dies raises BrokenProcessPool here
    # instead of being replaced forever.
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_write_part, job) for job in jobs]
        try:
            for done, future in enumerate(as_completed(futures), 1):
                future.result()  # the first failure raises here, not after the slow ones
                tick(done, len(jobs))
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
        if is_url(pattern) and glob.has_magic(pattern):
            matches = glob_urls(Storage(), pattern)
            if not matches:
                raise DataError("no objects match this pattern", source=pattern)
            out += matches
        elif not os.path.exists(pattern) and glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError("no files match this pattern", source=pattern)
            out += matches
        else:
            out.append(pattern)
    return out


def _attach_vectors(sample: dict, vectors: dict) -> None:
    """Give the sample (and its hard negatives) the vectors of their item ids, where the
    features file has one (an item it lacks has no vector: the "missing" embedding)."""
    for entry in [sample, *sample.get("hard_negatives", ())]:
        vector = vectors.get(entry["item_id"])
        if vector is not None:
            entry["features"] = vector.tolist()


def write_shards(inputs: list[str], out_dir: str, field_map: FieldMap, *,
                 shard_size: int = 100_000, overwrite: bool = False, workers: int = 1,
                 max_shard_bytes: int | None = None, gzip: bool = False,
                 gzip_block: int = DEFAULT_GZIP_BLOCK,
                 split_bytes: int = DEFAULT_SPLIT_BYTES, append: bool = False,
                 storage: Storage | None = None, features_file: tuple[str, str] | None = None,
                 force: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Convert click-log inputs into indexed WebDataset tar shards plus ``manifest.json``.

    Args:
        inputs: input files/folders (any format ``sources.iter_records`` reads) or globs,
            written in this order.
        out_dir: output folder (created, with parents; it appears only once complete) or
            URL (``s3://bucket/clicks/v3``: the manifest is uploaded last).
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
        append: add the shards of ``inputs`` to the shard set already at ``out_dir``
            (same field mapping and compression) without rewriting it: new shards get the
            next numbers, keys the next input numbers, and the grown manifest is written
            last. A loader resumed on the grown set starts a new epoch.
        storage: reads and writes URLs (default: a new ``Storage`` with no options).
        features_file: ``(matrix.npy, ids.txt)``: item feature vectors kept apart from the
            inputs, row i of the matrix belonging to the item id on line i; samples and hard
            negatives get the vector of their item id (exclusive with ``field_map.features``).
        force: ``append`` also inputs the manifest's ``sources`` list (else refused: read twice).
        progress: called as ``progress(done, total)`` each time a range of the inputs is
            written (``clicktower shard`` prints it).

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
    _check_options(field_map, features_file, append, overwrite)
    _check_sizes({"shard size": shard_size, "workers": workers, "gzip block": gzip_block,
                  "split bytes": split_bytes}, max_shard_bytes)
    storage = storage or Storage()
    out_dir = os.fspath(out_dir)
    out_dir = out_dir.rstrip("/" if is_url(out_dir) else os.sep) or out_dir
    previous = outputs.existing_manifest(out_dir, storage) if append else None
    if previous is not None:
        outputs.check_appendable(previous, field_map.to_dict(), gzip, gzip_block)
        outputs.check_new_sources(previous, [] if force else inputs, out_dir)
    else:
        outputs.check_out(out_dir, inputs, overwrite, storage)
    # Fail fast: every input exists, is readable and has the mapped fields before any shard
    # is written (a missing column in the last input should not cost a pass over the first).
    for path in inputs:
        check_fields(path, field_map)

    staging = outputs.staging_dir(out_dir)
    try:
        # Appended inputs continue the input numbers, so their keys stay unique in the set.
        ranges = _plan_ranges(inputs, split_bytes, len(previous["sources"]) if previous else 0)
        jobs = [{"range": r, "segments": segments, "directory": staging,
                 "field_map": field_map.to_dict(), "shard_size": shard_size,
                 "max_shard_bytes": max_shard_bytes, "gzip": gzip, "gzip_block": gzip_block,
                 "features_file": list(features_file) if features_file else None}
                for r, segments in enumerate(ranges)]
        parts = _run_parts(jobs, workers, progress)
        settings = {"shard_size": shard_size, "max_shard_bytes": max_shard_bytes, "gzip": gzip,
                    "gzip_block": gzip_block if gzip else None, "split_bytes": split_bytes,
                    "num_ranges": len(ranges)}
        first = len(previous["shards"]) if previous else 0
        manifest = _manifest(inputs, field_map, parts,
                             _number_shards(staging, parts, gzip, first), settings)
        if features_file is not None:
            manifest["fields"].append("features")
            manifest["features_file"] = list(features_file)
        if previous is not None:
            manifest = outputs.grown_manifest(previous, manifest)
        outputs.publish(staging, out_dir, manifest, storage, previous)
    except BaseException:
        outputs.remove_staging(staging)
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


def _check_options(field_map: FieldMap, features_file: tuple[str, str] | None, append: bool,
                   overwrite: bool) -> None:
    """Raise a DataError for ``write_shards`` options that exclude each other or a bad
    features file (read now: before any shard is written)."""
    if features_file is not None:
        if field_map.features is not None:
            raise DataError("write_shards: a features field and a features file exclude each other")
        load_features_file(*features_file)
    if append and overwrite:
        raise DataError("write_shards: append and overwrite exclude each other")

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


def _number_shards(tmp_dir: str, parts: list[dict], gzip: bool, first: int = 0) -> list[dict]:
    """The writers' shards renamed ``shard-<n>`` (and their indexes) in input order."""
    # Range order, then chunk, then part: the input order. Renamed to consecutive numbers
    # here, once every writer is done (a writer cannot know how many shards the ranges
    # before its own make).
    shards = [s for part in parts for s in part["shards"]]
    for number, shard in enumerate(shards, first):
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
            "field_map": field_map.to_dict(), "num_filtered": num_filtered, **settings,
            "popularity": outputs.merged_popularity(p["popularity"] for p in parts)}



def iter_shard(path: str) -> Iterator[dict]:
    """Yield the samples of one shard in file order, reading it from start to end.

    Args:
        path: a ``.tar`` or ``.tar.gz`` shard written by ``write_shards`` (path or URL;
            a URL is read whole into memory).

    Yields:
        Each sample dict (as ``to_sample`` made it) with ``"__key__"`` added; a feature
        vector comes back as a numpy array under ``"features"``.

    Raises:
        DataError: unreadable tar, or a sample without a valid ``.json`` member.
    """
    import gzip

    from webdataset.tariterators import group_by_keys, tar_file_expander

    path = os.fspath(path)
    if is_url(path):
        try:
            raw: Any = io.BytesIO(Storage().read_bytes(path))
        except FileNotFoundError:
            raise DataError("no such file", source=path) from None
    elif not os.path.isfile(path):
        raise DataError("no such file", source=path)
    else:
        raw = open(path, "rb")
    with raw, (gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw) as fh:
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
