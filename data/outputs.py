"""Where ``write_shards`` puts finished shards: a local folder (atomically), a URL (manifest
uploaded last), or an existing shard set it grows (``--append``).

Local output: the shards are written into a sibling ``out_dir.tmp-<pid>`` folder that is
renamed to ``out_dir`` only after the manifest is on disk, so an ``out_dir`` that exists is
complete. URL output (``s3://...``): the shards are written into a local temporary folder,
uploaded, and the manifest is uploaded last: a reader that finds the manifest finds every
shard it lists (a crash leaves unlisted objects, never a manifest without its shards).
Append: the new shards get the next numbers and go next to the old ones, which are not
touched; the grown manifest replaces the old one last (locally by an atomic rename).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter

from clicktower.data.errors import DataError
from clicktower.data.manifest import FORMAT, MANIFEST_NAME, VERSION, index_path, read_manifest_json
from clicktower.data.storage import Storage, is_url, join


def staging_dir(out_dir: str) -> str:
    """An empty folder to write the shards into: the sibling ``out_dir.tmp-<pid>`` of a
    local output (same filesystem: renamed into place), a temporary folder for a URL."""
    if is_url(out_dir):
        return tempfile.mkdtemp(prefix="clicktower-shard-")
    return _fresh_tmp_dir(out_dir)


def _fresh_tmp_dir(out_dir: str) -> str:
    """Create the empty sibling ``out_dir.tmp-<pid>`` that the shards are written into."""
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    if os.path.lexists(tmp_dir):  # a leftover from a killed run whose pid we now reuse
        shutil.rmtree(tmp_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    os.mkdir(tmp_dir)
    return tmp_dir


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
        for path in (p for p in inputs if not is_url(p)):
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






def existing_manifest(out_dir: str, storage: Storage) -> dict:
    """The manifest (plain JSON) of the shard set ``--append`` grows.

    Raises:
        DataError: no manifest there, or one this version cannot append to.
    """
    path, manifest = read_manifest_json(out_dir, storage)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError("cannot append: not a clicktower shard manifest", source=path)
    if manifest.get("version") != VERSION:
        raise DataError(f"cannot append to a version {manifest.get('version')} manifest "
                        f"(this clicktower writes version {VERSION}; re-shard it)", source=path)
    return manifest


def check_appendable(existing: dict, field_map: dict, gzip: bool, gzip_block: int) -> None:
    """Raise a DataError unless new shards written with these settings fit ``existing``."""
    if existing.get("field_map") != field_map:
        raise DataError(f"cannot append: the field mapping differs from the shard set's "
                        f"({existing.get('field_map')} vs {field_map})")
    if bool(existing.get("gzip")) != gzip or (gzip and existing.get("gzip_block") != gzip_block):
        raise DataError(f"cannot append: the shard set was written with gzip="
                        f"{bool(existing.get('gzip'))}, gzip_block={existing.get('gzip_block')}")


def check_new_sources(existing: dict, inputs: list[str], out_dir: str) -> None:
    """Raise a DataError when an input is already among the ``sources`` of the shard set
    being appended to (the same path as given, or the same file)."""
    listed = existing.get("sources") or []
    same = {os.path.abspath(s) for s in listed if not is_url(s)} | set(listed)
    for path in inputs:
        if path in same or not is_url(path) and os.path.abspath(path) in same:
            raise DataError(f"cannot append {path}: the shard set already holds it (its manifest's sources "
                            f"list it), so its pairs would be read twice per epoch; pass --force to append "
                            f"it again anyway", source=out_dir)


def check_out(out_dir: str, inputs: list[str], overwrite: bool, storage: Storage) -> None:
    """Raise a DataError unless ``write_shards`` may write a new shard set to ``out_dir``."""
    if not is_url(out_dir):
        _check_out_dir(out_dir, inputs, overwrite)
        return
    manifest = join(out_dir, MANIFEST_NAME)
    if storage.exists(manifest) and not overwrite:
        raise DataError("a shard set is already there; pass --overwrite to replace it or "
                        "--append to add to it", source=out_dir)


def publish(staging: str, out_dir: str, manifest: dict, storage: Storage,
            previous: dict | None = None) -> None:
    """Move the shards written in ``staging`` to ``out_dir`` and write ``manifest`` last.

    Args:
        staging: the folder ``staging_dir`` gave (removed afterwards).
        out_dir: the output folder or URL.
        manifest: the manifest to write (the grown one when appending).
        storage: for URLs.
        previous: the manifest being grown (``--append``), else None.
    """
    new = [s["path"] for s in manifest["shards"][len(previous["shards"]) if previous else 0:]]
    files = [name for shard in new for name in (shard, index_path(shard))]
    if is_url(out_dir):
        _publish_url(staging, out_dir, manifest, storage, files, append=previous is not None)
    elif previous is None:
        _write_json_durably(os.path.join(staging, MANIFEST_NAME), manifest)
        _fsync_dir(staging)
        _install(staging, out_dir)
    else:
        for name in files:   # the old shards stay where they are, untouched
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
        _fsync_dir(out_dir)
        tmp = os.path.join(out_dir, f"{MANIFEST_NAME}.tmp-{os.getpid()}")
        _write_json_durably(tmp, manifest)
        os.replace(tmp, os.path.join(out_dir, MANIFEST_NAME))
        _fsync_dir(out_dir)
        shutil.rmtree(staging, ignore_errors=True)


def _publish_url(staging: str, out_dir: str, manifest: dict, storage: Storage,
                 files: list[str], append: bool) -> None:
    target = join(out_dir, MANIFEST_NAME)
    old: list[str] = []
    if not append and storage.exists(target):   # --overwrite (check_out allowed it)
        _, previous = read_manifest_json(target, storage)
        old = [f for s in previous.get("shards", []) for f in (s["path"], index_path(s["path"]))]
        # The old manifest goes first: no reader may pair it with half-replaced shards.
        storage.remove(target)
    try:
        for name in files:
            storage.put_file(os.path.join(staging, name), join(out_dir, name))
        storage.write_bytes(target, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
        for name in sorted(set(old) - set(files)):
            storage.remove(join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def grown_manifest(previous: dict, new: dict) -> dict:
    """``previous`` with the shards, samples and sources of ``new`` (an appended part)."""
    return {**previous, "num_samples": previous["num_samples"] + new["num_samples"],
            "shards": previous["shards"] + new["shards"],
            "sources": previous.get("sources", []) + new["sources"],
            "num_filtered": previous.get("num_filtered", 0) + new["num_filtered"],
            "num_ranges": previous.get("num_ranges", 0) + new["num_ranges"],
            "appends": previous.get("appends", 0) + 1,
            # A set sharded before counts were recorded keeps none: partial counts would lie.
            **({"popularity": merged_popularity([previous["popularity"], new["popularity"]])}
               if "popularity" in previous else {})}


def remove_staging(staging: str) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def merged_popularity(parts) -> dict:
    """``{"items": {item id: samples}, "queries": {query text: samples}}`` summed over
    ``parts`` (the same form): what the logQ correction's ``counts`` source reads
    (docs/training.md, "Popularity correction"). Its size grows with the distinct ids."""
    out: dict = {"items": Counter(), "queries": Counter()}
    for part in parts:
        for kind in out:
            out[kind].update(part.get(kind, {}))
    return {kind: dict(counts) for kind, counts in out.items()}
