"""Bad data in shards: every class skipped-and-counted (default) or raised (on_error=raise),
and never a difference in batch counts between ranks."""
from __future__ import annotations

import json
import os

import pytest

from clicktower.data.errors import DataError
from clicktower.data.loader import ClickPairLoader, DataConfig, Rank
from clicktower.data.shards import FORMAT, VERSION, _ShardFile, _tar_member, index_path, write_shards
from clicktower.data.sources import FieldMap

pytestmark = pytest.mark.unit

GOOD = 40


def _good(i):
    return json.dumps({"query": f"query {i}", "item_id": str(i), "item_text": f"item {i}"}).encode()


def _hand_made(tmp_path, bad: list[tuple[str, bytes]]):
    """Two shards: 40 good samples, then the bad ones mixed into the second shard."""
    out = tmp_path / "shards"
    out.mkdir()
    members = [(f"k{i:04d}", _good(i)) for i in range(GOOD)]
    parts = [members[:20], members[20:30] + bad + members[30:]]
    entries = []
    for n, part in enumerate(parts):
        f = _ShardFile(str(out), f"shard-{n:06d}.tar", None)
        for key, data in part:
            f.add(_tar_member(f"{key}.json", data))
        entries.append(f.close())
    manifest = {"format": FORMAT, "version": VERSION, "fields": ["query", "item_id", "item_text"],
                "num_samples": sum(e["num_samples"] for e in entries), "shards": entries}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


CASES = {
    "invalid_json": [("bad0", b'{"query": "q", "item_id": ')],
    "invalid_utf8": [("bad0", b'{"query": "q\xff\xfe", "item_id": "1", "item_text": "t"}')],
    "missing_field": [("bad0", json.dumps({"query": "q", "item_id": "1"}).encode())],
    "empty_text": [("bad0", json.dumps({"query": "  \t", "item_id": "1", "item_text": "t"}).encode())],
    "text_too_long": [("bad0", json.dumps({"query": "q", "item_id": "1",
                                           "item_text": "x" * 30_000}).encode())],
    "duplicate_key": [("k0003", _good(3))],
}


def _epoch(path, world=2, batch=5, on_error="skip", buffer=8):
    per_rank, loaders = [], []
    cfg = DataConfig(num_workers=0, on_error=on_error, shuffle_buffer=buffer, block_size=4)
    for rank in range(world):
        loader = ClickPairLoader(cfg, str(path), batch, Rank(rank, world), 1)
        per_rank.append([b.keys for b in loader])
        loaders.append(loader)
    return per_rank, loaders


def _check_skip(per_rank, loaders, reason, n_bad, total, at_start=False):
    """Equal batch counts, no key twice, n_bad counted. at_start: the bad samples left the
    order before the epoch (index level), so the epoch is shorter instead of batches."""
    assert len({len(batches) for batches in per_rank}) == 1  # equal batch counts
    usable = total - n_bad if at_start else total
    assert len(per_rank[0]) == usable // 10
    keys = [k for batches in per_rank for b in batches for k in b]
    assert len(keys) == len(set(keys))
    if at_start:  # counted once per loader, the same on every rank
        assert all(l.error_counts()[reason] == n_bad for l in loaders)
        assert len(keys) == usable // 10 * 10
    else:
        counts = {r: sum(l.error_counts()[r] for l in loaders) for r in loaders[0].error_counts()}
        assert counts[reason] == n_bad, counts
        assert len(keys) == total // 10 * 10 - n_bad


@pytest.mark.parametrize("reason", sorted(CASES))
def test_bad_sample_skip_and_raise(tmp_path, reason, caplog):
    path = _hand_made(tmp_path, CASES[reason])
    total = GOOD + 1
    if reason == "duplicate_key":  # which copy counts as the duplicate depends on the order
        per_rank, loaders = _epoch(path, world=1, batch=41)
        keys = [k for b in per_rank[0] for k in b]
        assert sorted(keys) == sorted(f"k{i:04d}" for i in range(GOOD))
        assert loaders[0].error_counts()["duplicate_key"] == 1
    else:
        with caplog.at_level("WARNING", logger="clicktower.data"):
            per_rank, loaders = _epoch(path)
        # the remainder of 41 = 1: the bad one may be that dropped position
        skipped = sum(l.error_counts()[reason] for l in loaders)
        assert skipped in (0, 1)
        _check_skip(per_rank, loaders, reason, skipped, total)
        if skipped:
            assert "shard-000001.tar" in caplog.text and "'bad0'" in caplog.text
    with pytest.raises(DataError) as excinfo:
        _epoch(path, world=1, batch=41, on_error="raise")
    message = str(excinfo.value)
    # a duplicate is whichever copy the order reads second: in either shard
    assert "\n" not in message and ("shard-000001.tar" in message or
                                    reason == "duplicate_key" and "shard-000000.tar" in message)
    assert "'bad0'" in message or "'k0003'" in message


def test_missing_shard(tmp_path):
    path = _hand_made(tmp_path, [])
    os.remove(path / "shard-000000.tar")
    with pytest.raises(DataError, match="shard-000000.tar.*missing"):  # at start, not mid-epoch
        ClickPairLoader(DataConfig(on_error="raise"), str(path), 5)
    per_rank, loaders = _epoch(path)
    _check_skip(per_rank, loaders, "missing_shard", 20, GOOD, at_start=True)


def test_a_second_loader_of_the_checked_manifests_checks_and_warns_nothing_again(tmp_path, monkeypatch, caplog):
    """What training's sample pass (``model.projection_init=pca``) does: a second loader over
    the first one's ``manifests`` reads the same order without checking a shard file or
    reporting the missing shard again; a stricter policy does check again."""
    import clicktower.data.loader as loader_module

    path = _hand_made(tmp_path, [])
    os.remove(path / "shard-000000.tar")
    checks = []
    real_check = loader_module.check_shard_files
    monkeypatch.setattr(loader_module, "check_shard_files", lambda *a, **k: checks.append(1) or real_check(*a, **k))

    def warned():
        return sum("data.on_error=skip" in r.getMessage() for r in caplog.records)

    cfg = DataConfig(num_workers=0, on_error="skip")
    first = ClickPairLoader(cfg, str(path), 5, seed=1)
    assert len(checks) == 1 and warned() == 1
    second = ClickPairLoader(cfg, first.manifests[0], 5, seed=1)
    assert len(checks) == 1 and warned() == 1  # nothing checked or reported again
    assert [b.keys for b in second] == [b.keys for b in first]
    assert second.error_counts()["missing_shard"] == first.error_counts()["missing_shard"] == 20
    with pytest.raises(DataError, match="shard-000000.tar.*missing"):
        ClickPairLoader(DataConfig(num_workers=0, on_error="raise"), first.manifests[0], 5)
    assert len(checks) == 2  # checked under "skip" is not checked for "raise"


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_shard(tmp_path, gz):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"query": f"q{i}", "item_id": i, "item_text": f"t{i}"}) + "\n"
                           for i in range(60)))
    out = tmp_path / "s"
    write_shards([str(src)], str(out), FieldMap(), shard_size=30, gzip=gz, gzip_block=4)
    shard = out / ("shard-000001.tar.gz" if gz else "shard-000001.tar")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="shard-000001.*bytes"):
        ClickPairLoader(DataConfig(on_error="raise"), str(out), 5)
    per_rank, loaders = _epoch(out)
    lost = loaders[0].error_counts()["truncated"]
    assert 10 <= lost <= 20  # about the back half of shard 1; shard 0 and the rest intact
    _check_skip(per_rank, loaders, "truncated", lost, 60, at_start=True)


def test_corrupt_gzip(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"query": f"q{i}", "item_id": i, "item_text": f"t{i}"}) + "\n"
                           for i in range(60)))
    out = tmp_path / "s"
    manifest = write_shards([str(src)], str(out), FieldMap(), shard_size=60, gzip=True, gzip_block=8)
    shard = out / manifest["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    import numpy as np

    blocks = np.load(out / index_path(manifest["shards"][0]["path"]))[61:]
    lo, hi = int(blocks[2]), int(blocks[3])
    data[lo:hi] = b"\xff" * (hi - lo)  # same size: only a checksum would notice
    shard.write_bytes(bytes(data))
    per_rank, loaders = _epoch(out, buffer=60)  # 8 bad in a row: mix them over batches
    _check_skip(per_rank, loaders, "corrupt_gzip", 8, 60)
    with pytest.raises(DataError, match="shard-000000.tar.gz.*gzip"):
        _epoch(out, world=1, batch=60, on_error="raise")
