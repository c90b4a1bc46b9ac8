"""Shards replaced under a running loader (issue 26, case 3): every read is tied to the content
the manifest names, so a shard rewritten in place while the loader reads it is refused with one
line naming it, never mixed into the epoch. The node cache and S3 variants (keyed by the
manifest's sha256, ETags checked): tests/test_data_remote.py."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from clicktower.data.errors import DataError
from clicktower.data.loader import ClickPairLoader, DataConfig, Rank
from clicktower.data.shards import write_shards
from clicktower.data.sources import FieldMap

pytestmark = pytest.mark.unit

# Windows of one small block, one read in flight: most of the epoch is read after the rewrite.
ONE_AT_A_TIME = {"block_size": 16, "shuffle_buffer": 16, "interleave_shards": 1, "num_workers": 0,
                 "prefetch_blocks": 1, "io_threads": 1}
QUERY = b'"query":"'


def mark_queries(data: bytes) -> bytes:
    """``data`` with the first letter of every sample's query replaced by ``~``: the same
    size, the same tar headers and offsets, other samples (what a same-size rewrite of a
    shard looks like to a reader holding the old index)."""
    out, at = bytearray(data), data.find(QUERY)
    while at >= 0:
        out[at + len(QUERY)] = ord("~")
        at = data.find(QUERY, at + 1)
    return bytes(out)


def write_pairs(synth_dir: Path, folder: Path, n: int = 320) -> Path:
    """The first ``n`` synthetic pairs as shards of 100 in ``folder/shards``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = (synth_dir / "train.jsonl").read_text("utf-8").splitlines(keepends=True)[:n]
    (folder / "train.jsonl").write_text("".join(lines), "utf-8")
    write_shards([str(folder / "train.jsonl")], str(folder / "shards"), FieldMap(), shard_size=100)
    return folder / "shards"


def test_a_shard_rewritten_in_place_mid_epoch_is_refused_not_mixed(synth_dir, tmp_path):
    shards = write_pairs(synth_dir, tmp_path)
    loader = ClickPairLoader(DataConfig(**ONE_AT_A_TIME), str(shards), 16, Rank(0, 1), 3)
    it = iter(loader)
    queries = list(next(it).queries)
    time.sleep(0.05)   # a later modification time than the first reads'
    for path in sorted(shards.glob("shard-*.tar")):   # same size, same manifest, other samples
        with open(path, "r+b") as fh:
            fh.write(mark_queries(path.read_bytes()))
    with pytest.raises(DataError) as err:
        for batch in it:
            queries += batch.queries
    message = str(err.value)
    assert "\n" not in message and "/shard-0000" in message and "replaced while the loader reads it" in message
    assert not any(q.startswith("~") for q in queries)   # nothing of the new content got in
    assert len(queries) < 320


def test_a_shard_of_another_size_is_refused_at_its_first_read(synth_dir, tmp_path):
    shards = write_pairs(synth_dir, tmp_path)
    loader = ClickPairLoader(DataConfig(**ONE_AT_A_TIME), str(shards), 16, Rank(0, 1), 3)
    victim = shards / "shard-000002.tar"
    victim.write_bytes(victim.read_bytes() + b"\0" * 512)   # after the start-up check
    with pytest.raises(DataError, match=r"shard-000002.tar: replaced while the loader reads it \(\d+ bytes, "
                                        r"the manifest lists \d+\)"):
        for _ in loader:
            pass


def test_shards_rewritten_with_a_new_manifest_are_read_fresh(synth_dir, tmp_path):
    """The same paths, new content and a new manifest: a new loader reads the new samples
    (local files are read directly; the node cache applies to URLs, tested on S3)."""
    shards = write_pairs(synth_dir, tmp_path)
    cfg = DataConfig(**{**ONE_AT_A_TIME, "cache_dir": str(tmp_path / "cache")})
    first = [q for b in ClickPairLoader(cfg, str(shards), 16, Rank(0, 1), 3) for q in b.queries]
    text = (tmp_path / "train.jsonl").read_text("utf-8").replace('"query": "', '"query": "new ')
    (tmp_path / "train.jsonl").write_text(text, "utf-8")
    write_shards([str(tmp_path / "train.jsonl")], str(shards), FieldMap(), shard_size=100, overwrite=True)
    again = [q for b in ClickPairLoader(cfg, str(shards), 16, Rank(0, 1), 3) for q in b.queries]
    assert len(again) == len(first) == 320 and all(q.startswith("new ") for q in again)
