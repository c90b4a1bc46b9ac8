"""Evaluation during training: eval/ metrics in metrics.jsonl and the best model kept, on 1 and 2 ranks."""
from __future__ import annotations

import json

import pytest
import torch

from clicktower.launcher.retrieval.embedding import embed_slice, rank_slice

from conftest import TINY_CONFIG, clicktower
from dist_launch import accelerate_launch


class _CountingTower(torch.nn.Module):
    """Embeds row r (token id r + 1) as [r, 1]; counts forward passes."""

    embedding_dim = 2

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        rows = input_ids[:, 0].float() - 1
        return torch.stack([rows, torch.ones_like(rows)], dim=1)


def _tokenize(texts, **_):
    return {"input_ids": torch.tensor([[int(t) + 1] for t in texts]), "attention_mask": torch.ones(len(texts), 1)}


@pytest.mark.unit
@pytest.mark.parametrize("rows, world", [(10, 3), (2, 4), (7, 1), (9, 2), (5, 2)])
def test_sharded_embedding_slices_cover_rows_once_with_equal_forward_counts(rows, world):
    """Every rank embeds its rank_slice, in order, with the same number of forward passes
    (ZeRO-3 gathers weights in every forward: a rank with one fewer would hang the others)."""
    texts = [str(i) for i in range(rows)]
    calls, got = set(), []
    for rank in range(world):
        tower = _CountingTower()
        part = embed_slice(tower, _tokenize, texts, 8, rank, world, batch_size=2)
        calls.add(tower.calls)
        assert part.shape[0] == len(range(rows)[rank_slice(rows, rank, world)])
        got.extend(int(v) for v in part[:, 0])
    assert got == list(range(rows))
    assert len(calls) == 1


def _eval_args(synth_dir, shard_dir, out):
    return ["--config", str(TINY_CONFIG), f"data.train_manifest={shard_dir}", f"train.output_dir={out}",
            "train.max_steps=10", "train.progress_bar=false", "eval.every_steps=5",
            f"eval.queries={synth_dir / 'eval.jsonl'}", f"eval.catalog={synth_dir / 'catalog.jsonl'}",
            "eval.metric=recall@10"]


def _eval_records(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval/recall@10" in r]


@pytest.mark.e2e
@pytest.mark.slow
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


@pytest.mark.e2e
def test_eval_needs_queries_and_catalog():
    result = clicktower("train", "--config", str(TINY_CONFIG), "eval.every_steps=5")
    assert result.returncode == 2 and "eval.every_steps needs eval.queries and eval.catalog" in result.stderr
