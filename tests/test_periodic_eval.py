"""Evaluation during training: eval/ metrics in metrics.jsonl and the best model kept, on 1 and 2 ranks."""
from __future__ import annotations

import json

import pytest

from clicktower.launcher.periodic_eval import _padded_slice

from conftest import TINY_CONFIG, clicktower
from dist_launch import accelerate_launch


@pytest.mark.parametrize("rows, world", [(10, 3), (2, 4), (7, 1), (9, 2)])
def test_padded_slices_cover_rows_once_with_equal_counts(rows, world):
    slices = [_padded_slice(rows, r, world) for r in range(world)]
    assert len({len(indices) for indices, _ in slices}) == 1
    assert [i for indices, real in slices for i in indices[:real]] == list(range(rows))


def _eval_args(synth_dir, shard_dir, out):
    return ["--config", str(TINY_CONFIG), f"data.train_manifest={shard_dir}", f"train.output_dir={out}",
            "train.max_steps=10", "train.progress_bar=false", "eval.every_steps=5",
            f"eval.queries={synth_dir / 'eval.jsonl'}", f"eval.catalog={synth_dir / 'catalog.jsonl'}",
            "eval.metric=recall@10"]


def _eval_records(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval/recall@10" in r]


def test_eval_during_training_on_one_and_two_ranks(synth_dir, shard_dir, tmp_path):
    one = tmp_path / "one"
    result = clicktower("train", *_eval_args(synth_dir, shard_dir, one))
    assert result.returncode == 0, result.stderr[-2000:]
    evals = _eval_records(one)
    assert [r["step"] for r in evals] == [5, 10]
    assert all(0 <= r["eval/recall@10"] <= r["eval/recall@100"] <= 1 for r in evals)
    best = json.loads((one / "best" / "best.json").read_text())
    assert best["recall@10"] == max(r["eval/recall@10"] for r in evals)
    assert (one / "best" / "query_tower" / "config.json").is_file()

    two = tmp_path / "two"
    result = accelerate_launch("cpu_2proc_ddp", ["-m", "clicktower.launcher.train",
                                                 *_eval_args(synth_dir, shard_dir, two), "train.batch_size=8"])
    assert result.returncode == 0, result.stderr[-3000:]
    evals2 = _eval_records(two)
    assert [r["step"] for r in evals2] == [5, 10]
    assert evals2[0]["eval/num_queries"] == evals[0]["eval/num_queries"]  # every query, once


def test_eval_needs_queries_and_catalog():
    result = clicktower("train", "--config", str(TINY_CONFIG), "eval.every_steps=5")
    assert result.returncode == 2 and "eval.every_steps needs eval.queries and eval.catalog" in result.stderr
