"""Evaluation during training: eval/ metrics in metrics.jsonl and the best model kept, on 1 and 2 ranks."""
from __future__ import annotations

import json

import pytest
import torch

from clicktower.launcher.retrieval.embedding import embed_slice, rank_slice

from conftest import MINILM, TINY_CONFIG, clicktower
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


class _NoData:
    """The loader's checkpoint interface, without data (the evaluation does not read it)."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.unit
def test_resumed_run_replaces_best_only_with_a_better_score(tmp_path, monkeypatch):
    """The best (0.9 at step 2) came before the step-4 checkpoint; the requeued run's first
    evaluation (0.7 at step 6) is worse: best/ stays step 2's model. The best travels in the
    checkpoint's trainer state (the eval observer's), not in a side file."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from clicktower.launcher.engine import periodic_eval
    from clicktower.launcher.engine.checkpoint import CheckpointConfig, Checkpointer
    from clicktower.launcher.engine.loop import StepReport, TrainConfig, TrainLoop
    from clicktower.launcher.engine.metrics import MetricsLog
    from clicktower.launcher.engine.observers import EvalObserver
    from clicktower.modeling.towers import TwoTower, TwoTowerConfig

    scores = iter([0.9, 0.5, 0.7, 0.95])  # at steps 2, 4 | resumed: 6, 8
    real = periodic_eval.mean_metrics
    monkeypatch.setattr(periodic_eval, "mean_metrics", lambda rows: {**real(rows), "recall@10": next(scores)})
    catalog, queries = tmp_path / "catalog.jsonl", tmp_path / "eval.jsonl"
    catalog.write_text("".join(json.dumps({"item_id": f"i{k}", "item_text": f"drill {k}"}) + "\n" for k in range(4)))
    queries.write_text(json.dumps({"query": "drill", "relevance": {"i1": 3}}) + "\n")
    cfg = periodic_eval.EvalConfig(every_steps=2, queries=str(queries), catalog=str(catalog), metric="recall@10")
    model_cfg = TwoTowerConfig(bert_config=dict(vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32,
                                                max_position_embeddings=64), tokenizer=MINILM)
    acc, tokenizer = Accelerator(cpu=True), AutoTokenizer.from_pretrained(model_cfg.tokenizer_path)
    out = tmp_path / "run"
    out.mkdir()

    def start():
        """One start of the job (train.resume=auto): evaluator, loop, checkpointer, resumed."""
        torch.manual_seed(len(list(out.glob("checkpoints/step_*"))))  # each start: other weights
        evaluator = periodic_eval.PeriodicEvaluator(acc, TwoTower.from_config(model_cfg), tokenizer, cfg, out)
        observer = EvalObserver(evaluator, MetricsLog(out / "metrics.jsonl", True))
        loop = TrainLoop(None, _NoData(), TrainConfig(), [observer])
        ckpt = Checkpointer(acc, out, CheckpointConfig(), "")
        state = ckpt.resume("auto")
        if state is not None:
            loop.load_state_dict(state)
        observer.on_start(loop, state is not None)
        return loop, observer, ckpt

    def evaluate(loop, observer, step):
        loop.step = step
        observer.after_step(loop, StepReport(step, torch.tensor(0.0), [], [], 0))

    loop, observer, ckpt = start()
    evaluate(loop, observer, 2)
    evaluate(loop, observer, 4)
    ckpt.save(4, loop.state_dict())
    saved = json.loads((out / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert saved["observers"]["eval"]["best"] == {"metric": "recall@10", "score": 0.9, "step": 2}
    weights = {p.relative_to(out): p.read_bytes() for p in (out / "best").rglob("*") if p.is_file()}

    loop, observer, ckpt = start()  # requeued: resumed from step 4, with a newly built model
    assert loop.step == 4
    evaluate(loop, observer, 6)
    best = json.loads((out / "best" / "best.json").read_text())
    assert (best["step"], best["recall@10"]) == (2, 0.9)
    assert {p.relative_to(out): p.read_bytes() for p in (out / "best").rglob("*") if p.is_file()} == weights
    evaluate(loop, observer, 8)  # a better one does replace it
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 8
