"""clicktower shard at scale: parallel writers, byte caps, gzip, globs, item fields, features."""
from __future__ import annotations

import json

import numpy as np
import pytest

from clicktower.data.loader import ClickPairLoader
from clicktower.data.shards import iter_shard, load_manifest, write_shards
from clicktower.data.sources import FieldMap
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


def test_workers_give_identical_shards(logs, tmp_path):
    m1 = write_shards([str(logs / "part-*.jsonl")], str(tmp_path / "a"), FieldMap(), shard_size=40)
    m2 = write_shards([str(logs / "part-*.jsonl")], str(tmp_path / "b"), FieldMap(), shard_size=40, workers=2)
    assert m1["sources"] == [str(logs / f"part-{i}.jsonl") for i in range(3)]  # glob, sorted
    assert [(s["path"], s["sha256"]) for s in m1["shards"]] == [(s["path"], s["sha256"]) for s in m2["shards"]]
    assert m1["num_samples"] == 210 and len(m1["shards"]) == 6


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
    got = [k for b in ClickPairLoader(str(tmp_path / "g"), 10) for k in b["keys"]]
    assert sorted(got) == keys


def test_item_fields_and_features(logs, tmp_path):
    fm = FieldMap(item_text="no_such_field", item_fields=["title", "brand", "attributes"], features="emb")
    write_shards([str(logs / "part-1.jsonl")], str(tmp_path / "f"), fm, shard_size=100)
    sample = next(iter_shard(str(tmp_path / "f" / "shard-000000.tar")))
    assert sample["item_text"] == "Drill 0 | Varlo | colour: red"
    assert sample["item"] == {"title": "Drill 0", "brand": "Varlo", "attributes": {"colour": "red"}}
    assert sample["features"].dtype == np.float32 and sample["features"].tolist() == [0.0, 1.0, -1.0]
    batch = next(iter(ClickPairLoader(str(tmp_path / "f"), 8)))
    assert batch["item_features"].shape == (8, 3)


def test_cli_flags(logs, tmp_path):
    result = clicktower("shard", str(logs / "part-*.jsonl"), "--out", str(tmp_path / "c"), "--workers", "2",
                        "--shard-size", "100", "--max-shard-bytes", "16KiB", "--gzip")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["num_samples"] == 210
    bad = clicktower("shard", str(tmp_path / "nothing-*.jsonl"), "--out", str(tmp_path / "d"))
    assert bad.returncode == 2 and "no files match" in bad.stderr
