"""Per-sample fields the loss reads, end to end: exclusion lists (``--exclude-ids-field``),
teacher scores (``--teacher-field``) and graded positives (``--weight-field``), from the
input file through ``clicktower shard`` and the loader's batch into training (with hard
negatives, GradCache, distillation and ``train.epochs``)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from clicktower.data.errors import DataError
from clicktower.data.loader import ClickPairLoader, DataConfig, PairTokenizer, stable_id
from clicktower.data.sources import FieldMap, to_sample
from clicktower.modeling.towers import resolve_model_path

from conftest import MINILM, TINY_CONFIG, clicktower

FM = FieldMap(hard_negatives="negs", exclude_ids="judged", teacher_scores="teacher", weight="grade")


def _row(**extra) -> dict:
    return {"query": "drill", "item_id": "A", "item_text": "cordless drill",
            "negs": [{"item_id": "B", "item_text": "saw"}], "judged": ["C", 7], "teacher": [2.0, 0.5],
            "grade": 0.5, **extra}


@pytest.mark.unit
def test_to_sample_reads_exclusions_and_teacher_scores():
    sample = to_sample(_row(), FM, source="x.jsonl", row=1)
    assert sample["exclude_ids"] == ["C", "7"] and sample["teacher_scores"] == [2.0, 0.5]
    assert sample["weight"] == 0.5
    assert to_sample(_row(judged='["C", "D"]', teacher="[1, 2]"), FM, source="x.csv", row=1)["exclude_ids"] == \
        ["C", "D"]
    assert to_sample(_row(judged=None), FM, source="x.jsonl", row=1)["exclude_ids"] == []
    absent = _row()
    del absent["judged"]
    assert to_sample(absent, FM, source="x.jsonl", row=1)["exclude_ids"] == []
    assert FM.sample_fields()[-2:] == ["exclude_ids", "teacher_scores"]
    with pytest.raises(DataError, match="x.jsonl.*teacher.*2 scores for 3 candidates"):
        to_sample(_row(negs=[{"item_id": "B", "item_text": "saw"}, {"item_id": "E", "item_text": "bit"}]), FM,
                  source="x.jsonl", row=3)
    with pytest.raises(DataError, match="teacher"):
        to_sample(_row(teacher=[1.0, "high"]), FM, source="x.jsonl", row=1)
    with pytest.raises(DataError, match="judged"):
        to_sample(_row(judged={"C": 1}), FM, source="x.jsonl", row=1)
    with pytest.raises(DataError, match="teacher"):
        teacherless = _row()
        del teacherless["teacher"]
        to_sample(teacherless, FM, source="x.jsonl", row=1)


@pytest.fixture(scope="module")
def field_shards(synth_dir, tmp_path_factory):
    """The synthetic pairs with 2 hard negatives each, judged-item lists of 0-3 ids, teacher
    scores and a grade, sharded by the CLI."""
    catalog = [json.loads(line) for line in (synth_dir / "catalog.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (synth_dir / "train.jsonl").read_text().splitlines()][:400]
    path = tmp_path_factory.mktemp("fields") / "pairs.jsonl"
    with path.open("w") as fh:
        for i, row in enumerate(rows):
            negs = [c for c in (catalog[i % len(catalog)], catalog[(7 * i + 3) % len(catalog)])
                    if c["item_id"] != row["item_id"]]
            judged = [catalog[(i + j) % len(catalog)]["item_id"] for j in range(i % 4)]
            teacher = [3.0] + [float(j) for j in range(len(negs))]
            fh.write(json.dumps({**row, "negs": [{"item_id": n["item_id"], "item_text": n["item_text"]} for n in negs],
                                 "judged": judged, "teacher": teacher, "grade": 1.0 if i % 3 else 0.5}) + "\n")
    out = path.parent / "shards"
    result = clicktower("shard", str(path), "--out", str(out), "--shard-size", "200",
                        "--hard-negatives-field", "negs", "--exclude-ids-field", "judged",
                        "--teacher-field", "teacher", "--weight-field", "grade")
    assert result.returncode == 0, result.stderr[-2000:]
    return out, [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.e2e
def test_batch_carries_exclusions_teacher_scores_and_weights(field_shards):
    from transformers import AutoTokenizer

    shards, rows = field_shards
    manifest = json.loads((shards / "manifest.json").read_text())
    assert {"exclude_ids", "teacher_scores", "weight", "hard_negatives"} <= set(manifest["fields"])
    tokens = PairTokenizer(AutoTokenizer.from_pretrained(resolve_model_path(MINILM)), 16, 16)
    loader = ClickPairLoader(DataConfig(hard_negatives_per_query=1, shuffle_buffer=1), str(shards), 8, tokens=tokens)
    batch = next(iter(loader))
    assert batch.labels.exclude_ids.dtype == torch.int64 and batch.labels.exclude_ids.shape[0] == 8
    assert batch.labels.teacher_scores.shape == (8, 2)
    assert batch.labels.hard_negative_owner.tolist() == sorted(batch.labels.hard_negative_owner.tolist())
    seen_padding = False
    for row in range(8):
        record = rows[int(batch.keys[row].split("-")[1]) - 1]  # key: input number - row (1-based)
        assert (record["query"], record["item_text"]) == (batch.queries[row], batch.items[row])
        want = [stable_id(str(i)) for i in record["judged"]]
        got = [i for i in batch.labels.exclude_ids[row].tolist() if i != -1]
        assert got == want
        seen_padding |= -1 in batch.labels.exclude_ids[row].tolist()
        assert batch.labels.weights[row] == pytest.approx(record["grade"])  # graded positives
        kept = min(1, len(record["negs"]))
        assert batch.labels.teacher_scores[row, :1 + kept].tolist() == record["teacher"][:1 + kept]
        assert all(math.isnan(v) for v in batch.labels.teacher_scores[row, 1 + kept:].tolist())
        assert batch.labels.hard_negative_owner.tolist().count(row) == kept
    assert seen_padding  # lists of different lengths, padded with -1


@pytest.mark.e2e
def test_training_with_every_sample_field_grad_cache_and_epochs(field_shards, tmp_path):
    """One epoch (400 pairs, batch 16: 25 steps) with hard negatives under GradCache,
    exclusions, graded weights and distillation; the derived step count is what ran."""
    shards, _ = field_shards
    out = tmp_path / "run"
    result = clicktower("train", "--config", str(TINY_CONFIG), f"data.train_manifest={shards}",
                        f"train.output_dir={out}", "train.max_steps=null", "train.epochs=1",
                        "train.log_every_steps=5", "train.progress_bar=false", "data.hard_negatives_per_query=2",
                        "train.grad_cache_chunk=5", "loss.distill_weight=0.5", "loss.distill_temperature=2.0")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps[-1] == 400 // 16 and all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
    # config.yaml keeps the rule (epochs), not a step count that depends on the world size.
    train = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert train["epochs"] == 1 and train["max_steps"] is None
    # The LR schedule decays over the derived 25 steps (linear, 2 warmup steps): at its floor
    # after the last one, and at step 5 where 25 (not 100 or the file's 20) puts it.
    from clicktower.launcher.engine.optim import OptimConfig, lr_multiplier

    optim = OptimConfig(lr=3e-3, warmup_steps=2, schedule="linear")
    lrs = {m["step"]: m["lr"] for m in metrics if "lr" in m}
    assert lrs[25] == pytest.approx(3e-3 * optim.min_lr_ratio)
    assert lrs[5] == pytest.approx(3e-3 * lr_multiplier(5, optim, 25))
    assert lrs[5] != pytest.approx(3e-3 * lr_multiplier(5, optim, 20))
