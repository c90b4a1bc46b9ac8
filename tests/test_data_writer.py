"""clicktower shard at scale: parallel writers, byte caps, gzip, globs, item fields, features."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from clicktower.data.loader import ClickPairLoader, DataConfig
from clicktower.data.errors import DataError
from clicktower.data.shards import _plan_ranges, index_path, iter_shard, load_manifest, write_shards
from clicktower.data.sources import FieldMap, iter_records, split_input
from conftest import clicktower


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    for part in range(3):
        with open(root / f"part-{part}.jsonl", "w", encoding="utf-8") as fh:
            for i in range(70):
                fh.write(json.dumps({"query": f"q{part}-{i}", "item_id": i, "item_text": f"t{i} " * (i % 9 + 1),
                                     "title": f"Drill {i}", "brand": "Varlo", "attributes": {"colour": "red"},
                                     "emb": [i / 10, 1.0, -1.0]}) + "\n")
    return root


@pytest.mark.unit
def test_workers_give_identical_shards(logs, tmp_path):
    m1 = write_shards([str(logs / "part-*.jsonl")], str(tmp_path / "a"), FieldMap(), shard_size=40)
    m2 = write_shards([str(logs / "part-*.jsonl")], str(tmp_path / "b"), FieldMap(), shard_size=40, workers=2)
    assert m1["sources"] == [str(logs / f"part-{i}.jsonl") for i in range(3)]  # glob, sorted
    assert [(s["path"], s["sha256"]) for s in m1["shards"]] == [(s["path"], s["sha256"]) for s in m2["shards"]]
    assert m1["num_samples"] == 210 and len(m1["shards"]) == 6


@pytest.mark.unit
def test_max_bytes_and_gzip(logs, tmp_path):
    m = write_shards([str(logs / "part-0.jsonl")], str(tmp_path / "g"), FieldMap(), shard_size=50,
                     max_shard_bytes=20_000, gzip=True, gzip_block=8)
    assert all(s["path"].endswith(".tar.gz") for s in m["shards"]) and len(m["shards"]) > 2
    loaded = load_manifest(tmp_path / "g", verify_checksums=True)
    keys = [s["__key__"] for sh in loaded["shards"] for s in iter_shard(sh["path"])]
    assert keys == [f"00000-{i:012d}" for i in range(1, 71)]
    for sh in loaded["shards"]:  # the uncompressed tar of a shard stays under the cap
        idx = np.load(sh["index"])
        assert int(idx[sh["num_samples"]]) + 1024 <= 20_000
    got = [k for b in ClickPairLoader(DataConfig(), str(tmp_path / "g"), 10) for k in b.keys]
    assert sorted(got) == keys


@pytest.mark.unit
def test_item_fields_and_features(logs, tmp_path):
    fm = FieldMap(item_text="no_such_field", item_fields=["title", "brand", "attributes"], features="emb")
    write_shards([str(logs / "part-1.jsonl")], str(tmp_path / "f"), fm, shard_size=100)
    sample = next(iter_shard(str(tmp_path / "f" / "shard-000000.tar")))
    assert sample["item_text"] == "Drill 0 | Varlo | colour: red"
    assert sample["item"] == {"title": "Drill 0", "brand": "Varlo", "attributes": {"colour": "red"}}
    assert sample["features"].dtype == np.float32 and sample["features"].tolist() == [0.0, 1.0, -1.0]
    batch = next(iter(ClickPairLoader(DataConfig(), str(tmp_path / "f"), 8)))
    assert batch.item_features.shape == (8, 3)


@pytest.mark.e2e
def test_cli_flags(logs, tmp_path):
    result = clicktower("shard", str(logs / "part-*.jsonl"), "--out", str(tmp_path / "c"), "--workers", "2",
                        "--shard-size", "100", "--max-shard-bytes", "16KiB", "--gzip", "--split-bytes", "10KB")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["num_samples"] == 210
    bad = clicktower("shard", str(tmp_path / "nothing-*.jsonl"), "--out", str(tmp_path / "d"))
    assert bad.returncode == 2 and "no files match" in bad.stderr


def _records(path, part=None):
    return [(row, rec["query"]) for row, rec in iter_records(str(path), part)]


@pytest.mark.unit
def test_jsonl_ranges_read_every_line_once(tmp_path):
    # Blank lines, CRLF, a BOM and multi-byte text around the cut points.
    path = tmp_path / "big.jsonl"
    lines = ["\ufeff" + json.dumps({"query": "q0", "item_id": 0, "item_text": "ü"})]
    for i in range(1, 300):
        lines.append("" if i % 17 == 0 else "  " if i % 23 == 0 else
                     json.dumps({"query": f"q{i}", "item_id": i, "item_text": "é" * (i % 40)}, ensure_ascii=False))
    path.write_bytes("\r\n".join(lines).encode("utf-8") + b"\n")
    whole = _records(path)
    for split in (1, 97, 1000, 4096):
        pieces = split_input(str(path), split)
        assert len(pieces) > 1 and all(p["part"]["first_line"] >= 1 for p in pieces)
        assert sum(p["bytes"] for p in pieces) == path.stat().st_size
        got = [r for p in pieces for r in _records(path, p["part"])]
        assert got == whole  # same rows, same line numbers, none twice, none lost


@pytest.mark.unit
def test_parquet_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"query": f"q{i}", "item_id": i, "item_text": f"t{i}"} for i in range(50)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet", row_group_size=7)
    pieces = split_input(str(tmp_path / "c.parquet"), 200)
    assert len(pieces) > 2
    assert [r for p in pieces for r in _records(tmp_path / "c.parquet", p["part"])] == _records(
        tmp_path / "c.parquet")


@pytest.mark.unit
def test_csv_ranges_end_at_records(tmp_path):
    """CSV is cut where the csv parser ends a record: never inside a quoted multi-line field."""
    import csv
    import random

    rng = random.Random(0)
    path = tmp_path / "c.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        fh.write("\ufeff")
        writer = csv.writer(fh)
        writer.writerow(["query", "item_id", "item_text"])
        for i in range(300):
            text = rng.choice(["plain", "with, comma", "multi\nline\nfield", 'a "quote"', "ü€"])
            writer.writerow([f"q{i}", i, text * (i % 4 + 1)])
            if i % 37 == 0:
                fh.write("\r\n")   # a blank line: not a row
    whole = list(iter_records(str(path)))
    assert any("\n" in r["item_text"] for _, r in whole)
    for split in (1, 50, 333, 2000):
        pieces = split_input(str(path), split)
        assert len(pieces) > 1
        assert [r for p in pieces for r in iter_records(str(path), p["part"])] == whole
    m = write_shards([str(path)], str(tmp_path / "out"), FieldMap(), shard_size=40, split_bytes=2000,
                     workers=2)
    assert m["num_ranges"] > 2
    keys = [s["__key__"] for sh in load_manifest(tmp_path / "out")["shards"] for s in iter_shard(sh["path"])]
    assert keys == [f"00000-{r:012d}" for r in range(1, 301)]


@pytest.mark.unit
def test_writers_split_the_input_and_agree(logs, tmp_path):
    """N writers share the ranges (each record read by one), and any N gives the same shards."""
    inputs = [str(logs / "part-0.jsonl"), str(logs / "part-1.jsonl"), str(logs / "part-2.jsonl")]
    split = 6_000   # each 70-line file (~16 KB) is cut into several ranges
    ranges = _plan_ranges(inputs, split)
    assert len(ranges) >= 6
    read = [(seg["source"], row) for rng in ranges for seg in rng
            for row, _ in iter_records(seg["path"], seg["part"])]
    assert sorted(read) == [(s, r) for s in range(3) for r in range(1, 71)]  # each record once
    m1 = write_shards(inputs, str(tmp_path / "a"), FieldMap(), shard_size=25, split_bytes=split)
    m3 = write_shards(inputs, str(tmp_path / "b"), FieldMap(), shard_size=25, split_bytes=split,
                      workers=3)
    assert m1["num_ranges"] == m3["num_ranges"] == len(ranges)
    assert m1["shards"] == m3["shards"]  # same names, counts, bytes and checksums
    keys = [s["__key__"] for sh in load_manifest(tmp_path / "b")["shards"] for s in iter_shard(sh["path"])]
    assert keys == [f"{s:05d}-{r:012d}" for s in range(3) for r in range(1, 71)]
    assert max(s["num_samples"] for s in m1["shards"]) <= 25


@pytest.mark.unit
def test_manifest_memory_is_per_shard_arrays(tmp_path):
    """load_manifest keeps ~80 bytes a shard (ShardTable arrays), not a dict per shard."""
    import tracemalloc

    from clicktower.data.shards import FORMAT, index_bytes

    n = 3000
    shards = []
    for i in range(n):   # empty files of the listed sizes: loading only stats them
        name = f"shard-{i:06d}.tar"
        with open(tmp_path / name, "wb") as fh:
            fh.truncate(2048)
        with open(tmp_path / index_path(name), "wb") as fh:
            fh.truncate(index_bytes(3, None))
        shards.append({"path": name, "num_samples": 3, "bytes": 2048, "sha256": f"{i:064x}"})
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "version": 3, "num_samples": 3 * n, "fields": ["query", "item_id", "item_text"],
        "shards": shards}))
    del shards
    tracemalloc.start()
    manifest = load_manifest(tmp_path)
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(manifest["shards"]) == n and manifest["shards"][7]["sha256"] == f"{7:064x}"
    assert kept / n < 200, kept / n     # a list of dicts kept ~1.6 KiB a shard
    assert peak / n < 1200, peak / n    # the JSON text and a tuple a shard while loading (~750)


@pytest.mark.unit
def test_version_2_manifest_still_loads(logs, tmp_path):
    out = tmp_path / "v2"
    write_shards([str(logs / "part-0.jsonl")], str(out), FieldMap(), shard_size=30, gzip=True, gzip_block=8)
    m = json.loads((out / "manifest.json").read_text())
    m["version"] = 2
    for sh in m["shards"]:   # version 2 listed the index and the gzip block per shard
        sh.update(index=index_path(sh["path"]), index_bytes=os.path.getsize(out / index_path(sh["path"])),
                  gzip_block=8)
    del m["gzip_block"]
    (out / "manifest.json").write_text(json.dumps(m))
    got = [k for b in ClickPairLoader(DataConfig(), str(out), 10) for k in b.keys]
    assert sorted(got) == [f"00000-{i:012d}" for i in range(1, 71)]
    m["shards"][1]["index_bytes"] += 8
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"index 'shard-000001.idx.npy' of shard 'shard-000001.tar.gz' has"):
        load_manifest(out)


@pytest.mark.unit
def test_shard_records_popularity_counts_and_append_adds_to_them(logs, tmp_path):
    """Every written sample counts once for its item id and its query (parallel writers
    merged); --append adds the new inputs' counts; popularity_counts keys them by the ids the
    loader gives (stable_id), summed over a mix's manifests."""
    import torch

    from clicktower.data.loader import popularity_counts, stable_id

    out = tmp_path / "pop"
    m = write_shards([str(logs / "part-0.jsonl"), str(logs / "part-1.jsonl")], str(out), FieldMap(),
                     shard_size=40, workers=2)
    assert m["popularity"]["items"]["5"] == 2 and sum(m["popularity"]["items"].values()) == 140
    assert m["popularity"]["queries"]["q1-5"] == 1 and len(m["popularity"]["queries"]) == 140
    grown = write_shards([str(logs / "part-2.jsonl")], str(out), FieldMap(), shard_size=40, append=True)
    assert grown["popularity"]["items"]["5"] == 3 and len(grown["popularity"]["queries"]) == 210
    assert json.loads((out / "manifest.json").read_text())["popularity"] == grown["popularity"]
    write_shards([str(logs / "part-0.jsonl")], str(tmp_path / "other"), FieldMap(), shard_size=40)
    counts = popularity_counts([str(out), str(tmp_path / "other")])
    ids, n = counts["items"]
    assert int(n[ids == stable_id("5")]) == 4 and int(n.sum()) == 280
    assert counts["queries"][0].dtype == torch.int64 and len(counts["queries"][0]) == 210
