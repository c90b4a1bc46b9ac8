"""Write click pairs into WebDataset tar shards with a manifest, and read them back.

Layout of a shard directory::

    out_dir/
      manifest.json          # written last; its presence means "complete"
      shard-000000.tar
      shard-000001.tar
      ...

Each sample in a shard is one tar member ``<key>.json`` holding the sample dict from
``clicktower.data.sources.to_sample``. The key is ``SSSSS-RRRRRRRRRRRR``: the input's index in
``inputs`` and the record's row (JSONL: line) number in it. It is unique, and stable for the
same inputs whatever the shard size, so samples can be joined across re-shardings. Later
formats may add members next to ``json`` (feature vectors, item fields...): readers pick
members by extension and ignore the ones they do not know.

Crash safety: everything is written into a sibling ``out_dir.tmp-<pid>`` directory that is
renamed to ``out_dir`` only after the manifest is on disk, so an ``out_dir`` that exists is
complete; on any error the temporary directory is removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
from typing import Iterator

from clicktower.data.errors import DataError, short_repr
from clicktower.data.sources import FieldMap, check_fields, iter_records, to_sample

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "VERSION",
    "iter_shard",
    "load_manifest",
    "sample_key",
    "write_shards",
]

FORMAT = "clicktower.clickpairs"
VERSION = 1
MANIFEST_NAME = "manifest.json"
_REQUIRED_FIELDS = ("query", "item_id", "item_text")
# Fixed member mtime: the same inputs give byte-identical shards, hence identical sha256.
_TAR_MTIME = 0
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def shard_name(index: int) -> str:
    """File name of shard ``index`` (relative to the manifest)."""
    return f"shard-{index:06d}.tar"


def sample_key(source_index: int, row: int) -> str:
    """The ``__key__`` of the sample from row ``row`` of input number ``source_index``.

    Keys contain no dot: WebDataset splits member names at the first dot of the basename.
    """
    return f"{source_index:05d}-{row:012d}"


def _encode_sample(key: str, sample: dict) -> dict:
    """Sample dict -> tar members. The one place to add members (``.npy``...) later."""
    data = json.dumps(sample, ensure_ascii=False, separators=(",", ":"))
    return {"__key__": key, "json": data.encode("utf-8")}


def _decode_sample(members: dict, shard: str) -> dict:
    key = members.get("__key__")
    if "json" not in members:
        raise DataError(f"sample {key!r} has no .json member", source=shard)
    try:
        sample = json.loads(members["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"sample {key!r}: invalid JSON member ({exc})", source=shard) from None
    if not isinstance(sample, dict):
        raise DataError(f"sample {key!r}: JSON member is not an object", source=shard)
    sample["__key__"] = key
    return sample


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------

class _HashingFile:
    """Write-only file wrapper that hashes and counts bytes as they are written, so the
    manifest's sha256 and size cost no second read of the shard."""

    def __init__(self, fh):
        self.fh = fh
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.fh.write(data)
        self.sha256.update(data)
        self.bytes += len(data)
        return len(data)

    def flush(self):
        self.fh.flush()


class _ShardSetWriter:
    """Rolls over to a new ``TarWriter`` every ``shard_size`` samples. Shards are opened
    lazily so that no empty trailing shard is ever written."""

    def __init__(self, directory: str, shard_size: int):
        self.directory = directory
        self.shard_size = shard_size
        self.shards: list[dict] = []
        self._fh = None
        self._hashing = None
        self._tar = None
        self._count = 0

    def add(self, key: str, sample: dict):
        if self._tar is None:
            self._open()
        self._tar.write(_encode_sample(key, sample))
        self._count += 1
        if self._count >= self.shard_size:
            self._close_current()

    def _open(self):
        import webdataset as wds

        name = shard_name(len(self.shards))
        self._fh = open(os.path.join(self.directory, name), "wb")
        self._hashing = _HashingFile(self._fh)
        # encoder=False: members are already bytes (see _encode_sample); mtime fixed for
        # reproducible bytes.
        self._tar = wds.TarWriter(self._hashing, encoder=False, mtime=_TAR_MTIME)
        self._count = 0
        self._name = name

    def _close_current(self):
        self._tar.close()  # writes the tar end-of-archive blocks through _hashing
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        path = os.path.join(self.directory, self._name)
        size = os.path.getsize(path)
        if size != self._hashing.bytes:  # pragma: no cover - would be a bug in the wrapper
            raise RuntimeError(f"{path}: wrote {self._hashing.bytes} bytes, file has {size}")
        self.shards.append({"path": self._name, "num_samples": self._count,
                            "bytes": size, "sha256": self._hashing.sha256.hexdigest()})
        self._tar = self._fh = self._hashing = None

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._close_current()
        return self.shards

    def abort(self):
        # Close the tar stream before its file: an unclosed tarfile stream flushes itself at
        # garbage collection, into an already closed file. The bytes are discarded anyway.
        if self._tar is not None:
            try:
                self._tar.close()
            except Exception:
                pass
        if self._fh is not None:
            self._fh.close()
        self._tar = self._fh = self._hashing = None


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


def write_shards(inputs: list[str], out_dir: str, field_map: FieldMap, *,
                 shard_size: int = 100_000, overwrite: bool = False) -> dict:
    """Convert click-log inputs into WebDataset tar shards plus ``manifest.json``.

    Args:
        inputs: input files/folders (any format ``sources.iter_records`` reads), written in
            this order.
        out_dir: output directory; created (with parents). It appears only once complete.
        field_map: which input fields make up a sample, and the ``min_label`` filter.
        shard_size: samples per shard (the last shard may hold fewer).
        overwrite: replace an existing, non-empty ``out_dir`` (only a previous shard
            directory is ever replaced).

    Returns:
        The manifest, as written: ``{"format", "version", "num_samples", "fields",
        "shards": [{"path", "num_samples", "bytes", "sha256"}], "sources", "field_map",
        "num_filtered", "shard_size"}`` with shard paths relative to ``out_dir``.

    Raises:
        DataError: bad arguments, existing output without ``overwrite``, any bad input
            (see ``sources``), or no samples at all. Nothing is left behind on error.
    """
    if isinstance(inputs, (str, bytes, os.PathLike)) or not inputs:
        raise DataError("write_shards: inputs must be a non-empty list of paths")
    inputs = [os.fspath(p) for p in inputs]
    if not isinstance(field_map, FieldMap):
        raise DataError(f"write_shards: field_map must be a FieldMap, got "
                        f"{type(field_map).__name__}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"shard size must be a positive integer, got {short_repr(shard_size)}")
    out_dir = os.fspath(out_dir)
    out_dir = out_dir.rstrip(os.sep) or out_dir

    _check_out_dir(out_dir, inputs, overwrite)
    # Fail fast: every input exists, is readable and has the mapped fields before any shard
    # is written (a missing column in the last input should not cost a pass over the first).
    for path in inputs:
        check_fields(path, field_map)

    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    if os.path.lexists(tmp_dir):  # a leftover from a killed run whose pid we now reuse
        shutil.rmtree(tmp_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    os.mkdir(tmp_dir)
    writer = _ShardSetWriter(tmp_dir, shard_size)
    try:
        num_rows = num_filtered = 0
        for source_index, path in enumerate(inputs):
            for row, record in iter_records(path):
                num_rows += 1
                sample = to_sample(record, field_map, source=path, row=row)
                if sample is None:
                    num_filtered += 1
                    continue
                writer.add(sample_key(source_index, row), sample)
        shards = writer.close()
        num_samples = sum(s["num_samples"] for s in shards)
        if num_samples == 0:
            why = (f"all {num_rows} rows have {field_map.label} < {field_map.min_label:g}"
                   if num_filtered else "no rows")
            raise DataError(f"no samples: {why}", source=", ".join(inputs))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "num_samples": num_samples,
            "fields": field_map.sample_fields(),
            "shards": shards,
            "sources": inputs,
            "field_map": field_map.to_dict(),
            "num_filtered": num_filtered,
            "shard_size": shard_size,
        }
        manifest_path = os.path.join(tmp_dir, MANIFEST_NAME)
        with open(manifest_path, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp_dir)
        _install(tmp_dir, out_dir)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------

def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(path: str, *, verify_checksums: bool = False) -> dict:
    """Read and validate a shard manifest.

    Args:
        path: the ``manifest.json`` file or the directory holding it.
        verify_checksums: also re-hash every shard and compare with its ``sha256``
            (reads all the data; sizes are always checked).

    Returns:
        The manifest dict, with each shard's ``"path"`` made absolute, plus ``"path"`` (the
        absolute manifest file, for messages) and ``"root"`` (its directory).

    Raises:
        DataError: missing/invalid manifest, unknown format or version, or a shard that is
            missing or whose size (or checksum) differs from the manifest, naming the shard.
    """
    path = os.fspath(path)
    manifest_path = os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(manifest_path):
        raise DataError("no such file" if not os.path.isdir(path) else
                        f"no {MANIFEST_NAME} (not a shard directory, or still being written)",
                        source=manifest_path if not os.path.isdir(path) else path)
    try:
        with open(manifest_path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"not valid JSON ({exc})", source=manifest_path) from None

    def bad(message, field=None):
        return DataError(message, source=manifest_path, field=field)

    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    if manifest.get("format") != FORMAT:
        raise bad(f"not a clicktower shard manifest: format {short_repr(manifest.get('format'))},"
                  f" expected {FORMAT!r}", "format")
    if manifest.get("version") != VERSION:
        raise bad(f"unsupported version {short_repr(manifest.get('version'))}; "
                  f"this clicktower reads version {VERSION}", "version")
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

    root = os.path.dirname(os.path.abspath(manifest_path))
    resolved = []
    for i, shard in enumerate(shards):
        where = f"shards[{i}]"
        if not isinstance(shard, dict):
            raise bad("must be an object", where)
        rel = shard.get("path")
        if not isinstance(rel, str) or not rel or os.path.isabs(rel):
            raise bad(f"path must be relative to the manifest, got {short_repr(rel)}", where)
        for key in ("num_samples", "bytes"):
            value = shard.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(f"{key} must be a non-negative integer, got {short_repr(value)}",
                          where)
        if not isinstance(shard.get("sha256"), str) or not _SHA256_RE.match(shard["sha256"]):
            raise bad(f"sha256 must be 64 hex digits, got {short_repr(shard.get('sha256'))}",
                      where)
        abs_path = os.path.normpath(os.path.join(root, rel))
        if not os.path.isfile(abs_path):
            raise bad(f"shard {rel!r} is missing ({abs_path})")
        size = os.path.getsize(abs_path)
        if size != shard["bytes"]:
            raise bad(f"shard {rel!r} has {size} bytes, the manifest lists {shard['bytes']} "
                      f"(truncated or modified)")
        if verify_checksums and _sha256_file(abs_path) != shard["sha256"]:
            raise bad(f"shard {rel!r}: sha256 differs from the manifest (corrupted or modified)")
        resolved.append({**shard, "path": abs_path})
    total = sum(s["num_samples"] for s in resolved)
    if total != num_samples:
        raise bad(f"is {num_samples} but the shards hold {total}", "num_samples")
    return {**manifest, "shards": resolved, "path": os.path.abspath(manifest_path),
            "root": root}


def iter_shard(path: str) -> Iterator[dict]:
    """Yield the samples of one shard in file order.

    Args:
        path: a ``.tar`` shard written by ``write_shards``.

    Yields:
        Each sample dict (as ``to_sample`` made it) with ``"__key__"`` added.

    Raises:
        DataError: unreadable tar, or a sample without a valid ``.json`` member.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError("no such file", source=path)
    with open(path, "rb") as fh:
        members = group_by_keys(tar_file_expander([{"url": path, "stream": fh}]))
        try:
            for sample in members:
                yield _decode_sample(sample, path)
        except tarfile.TarError as exc:
            raise DataError(f"not a readable tar shard ({exc.args[0] if exc.args else exc})",
                            source=path) from None
