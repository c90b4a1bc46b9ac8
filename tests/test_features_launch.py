"""Item feature vectors through the real launcher: `accelerate launch` on 2 CPU processes, the
tiny BERT with model.item_features_dim, hard negatives that carry their own vectors, then
`clicktower eval` with the catalog's vectors and the cold/warm split."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from clicktower.data.shards import write_shards
from clicktower.data.sources import FieldMap
from clicktower.data.synth import generate
from conftest import TINY_CONFIG, clicktower
from dist_launch import accelerate_launch

DIM = 8
STEPS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Synthetic clicks with 8-dim "image" vectors, cold items, and 2 hard negatives a pair."""
    root = tmp_path_factory.mktemp("mm")
    generate(root / "synth", 600, seed=3, image_features=DIM, cold_items=20, num_eval_queries=30)
    catalog = [json.loads(line) for line in (root / "synth" / "catalog.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    with open(root / "train_hn.jsonl", "w") as fh:
        for line in (root / "synth" / "train.jsonl").read_text().splitlines():
            row = json.loads(line)
            row["negs"] = [n for n in rng.sample(catalog, 2) if n["item_id"] != row["item_id"]]
            fh.write(json.dumps(row) + "\n")
    write_shards([str(root / "train_hn.jsonl")], str(root / "shards"),
                 FieldMap(features="features", hard_negatives="negs"), shard_size=200)
    return root


@pytest.mark.e2e
@pytest.mark.parametrize("config, extra", [
    ("cpu_2proc_ddp", ["model.item_features_fusion=gated", "data.hard_negatives_per_query=2"]),
    pytest.param("cpu_2proc_zero3", ["data.hard_negatives_per_query=2"], marks=pytest.mark.slow),
    pytest.param("cpu_2proc_ddp", ["train.grad_cache_chunk=4", "model.shared_towers=false"], marks=pytest.mark.slow),
])
def test_fused_item_tower_trains_under_the_launcher_and_evaluates(data, tmp_path, config, extra):
    out = tmp_path / "run"
    result = accelerate_launch(config, [
        "-m", "clicktower.launcher.train", "--config", str(TINY_CONFIG), f"data.train_manifest={data / 'shards'}",
        f"train.output_dir={out}", f"train.max_steps={STEPS}", "train.log_every_steps=1",
        "train.progress_bar=false", "train.batch_size=8", f"model.item_features_dim={DIM}",
        "model.item_features_dropout=0.1", *extra])
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["data_bad_features"] == 0
    if "data.hard_negatives_per_query=2" in extra:
        # 5% of the synthetic products have no "image": among 2 x 4 x 8 random negatives some lack one.
        assert records[-1]["data_missing_features"] > 0
    meta = json.loads((out / "final" / "item_tower" / "clicktower_tower.json").read_text())
    assert meta["item_features_dim"] == DIM

    ev = clicktower("eval", "--model", str(out / "final"), "--queries", str(data / "synth" / "eval.jsonl"),
                    "--catalog", str(data / "synth" / "catalog.jsonl"), "--train-manifest", str(data / "shards"),
                    timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    summary = json.loads(ev.stdout.strip().splitlines()[-1])
    assert summary["missing_features"] > 0 and summary["bad_features"] == 0
    assert summary["cold/num_queries"] + summary["warm/num_queries"] == summary["num_queries"]
    assert 0.0 <= summary["warm/recall@10"] <= 1.0
