"""PairBatch owns the item-row layout (the pairs' items, then the hard negatives) and its
labels: splitting the item embeddings, GradCache chunks, model inputs, and what the loader's
collate puts where."""
from __future__ import annotations

import math

import pytest
import torch

from clicktower.data import PairBatch, PairLabels
from clicktower.data.loader import DataConfig, _collate, stable_id

pytestmark = pytest.mark.unit

B, H = 5, 3


def _batch(hard: int | None = H, features: bool = True) -> PairBatch:
    """B pairs and ``hard`` hard negatives whose every tensor row holds its item-row number:
    query row a is ``100 + a``, item row r is ``r`` (r >= B: hard negative r - B)."""
    rows = B + (hard or 0)
    keys = [f"k{a}" for a in range(B)]
    tokens = {"query_input_ids": (100 + torch.arange(B))[:, None].repeat(1, 4),
              "query_attention_mask": torch.ones(B, 4, dtype=torch.long),
              "item_input_ids": torch.arange(rows)[:, None].repeat(1, 6),
              "item_attention_mask": torch.ones(rows, 6, dtype=torch.long)}
    labels = PairLabels(item_ids=torch.arange(B) + 10, query_ids=torch.arange(B) + 20,
                        hard_negative_ids=None if hard is None else torch.arange(hard) + 30)
    batch = PairBatch(keys=keys, queries=keys, items=keys, labels=labels, tokens=tokens)
    if features:
        batch.item_features = torch.arange(rows, dtype=torch.float32)[:, None].repeat(1, 2)
        batch.item_features_present = torch.ones(rows, dtype=torch.bool)
    return batch


def test_split_items_cuts_the_item_rows_after_the_pairs():
    batch = _batch()
    emb = torch.arange(B + H, dtype=torch.float32)[:, None]
    items, hard = batch.split_items(emb)
    assert items[:, 0].tolist() == [0, 1, 2, 3, 4] and hard[:, 0].tolist() == [5, 6, 7]
    assert (batch.num_pairs, batch.num_hard_negatives, len(batch)) == (B, H, B)
    with pytest.raises(ValueError, match="7 item embeddings for 5 items and 3 hard negatives"):
        batch.split_items(emb[:7])
    # No hard negatives: the rows are the items, untouched; none left over.
    plain = _batch(None)
    emb = torch.arange(B, dtype=torch.float32)[:, None]
    items, hard = plain.split_items(emb)
    assert items is emb and hard is None and plain.num_hard_negatives is None
    # Hard negatives announced but none this batch: an empty tensor, not None.
    _, hard = _batch(0).split_items(emb)
    assert hard.shape == (0, 1)


def test_chunks_take_their_pairs_and_a_slice_of_the_hard_negatives():
    batch = _batch()
    chunks = batch.chunks(2)
    assert [(c.pairs, c.negatives) for c in chunks] == [((0, 3), (0, 2)), ((3, 5), (2, 3))]
    # Chunk 0: pairs 0-2, then hard negatives 0-1 (item rows 5, 6); chunk 1: pairs 3-4, then row 7.
    want_rows = [[0, 1, 2, 5, 6], [3, 4, 7]]
    for chunk, rows, (a, b) in zip(chunks, want_rows, [(0, 3), (3, 5)]):
        assert chunk.inputs["item_input_ids"][:, 0].tolist() == rows
        assert chunk.inputs["item_attention_mask"].shape[0] == len(rows)
        assert chunk.inputs["item_features"][:, 0].tolist() == rows  # feature rows sliced alike
        assert chunk.inputs["item_features_present"].shape == (len(rows),)
        assert chunk.inputs["query_input_ids"][:, 0].tolist() == [100 + i for i in range(a, b)]
        own, hard = chunk.split_items(chunk.inputs["item_input_ids"][:, :1].float())
        assert own[:, 0].tolist() == list(range(a, b)) and hard[:, 0].tolist() == rows[b - a:]
    # Together the chunks cover the pairs and the hard negatives once, in order.
    parts = [c.split_items(c.inputs["item_input_ids"][:, 0]) for c in chunks]
    assert torch.cat([p[0] for p in parts]).tolist() == list(range(B))
    assert torch.cat([p[1] for p in parts]).tolist() == list(range(B, B + H))


def test_chunks_without_hard_negatives_and_more_chunks_than_negatives():
    chunks = _batch(None, features=False).chunks(3)
    assert [c.pairs for c in chunks] == [(0, 2), (2, 4), (4, 5)] and all(c.negatives == (0, 0) for c in chunks)
    assert [c.inputs["item_input_ids"][:, 0].tolist() for c in chunks] == [[0, 1], [2, 3], [4]]
    assert "item_features" not in chunks[0].inputs
    chunks = _batch(1).chunks(3)  # one negative: it goes to the first chunk, the others get none
    assert [c.negatives for c in chunks] == [(0, 1), (1, 1), (1, 1)]
    assert [c.inputs["item_input_ids"][:, 0].tolist() for c in chunks] == [[0, 1, 5], [2, 3], [4]]


def test_model_inputs_and_to():
    batch = _batch(features=False)
    assert sorted(batch.model_inputs()) == ["item_attention_mask", "item_input_ids", "query_attention_mask",
                                           "query_input_ids"]
    assert "item_features_present" in _batch().model_inputs()
    with pytest.raises(ValueError, match="PairTokenizer"):
        PairBatch(keys=["a"], queries=["q"], items=["i"]).model_inputs()
    moved = batch.to("cpu")
    assert moved is not batch and moved.labels.item_ids.tolist() == batch.labels.item_ids.tolist()
    assert moved.labels.weights is None and moved.keys == batch.keys


class _Tokens:
    """Keeps the texts it is given (queries, then items and hard negatives)."""

    def __call__(self, queries, items, pad_to_multiple_of):
        return {"queries": queries, "item_rows": items}


def _sample(i: int, negatives: int, **extra) -> dict:
    return {"__key__": f"s{i}", "query": f"q{i}", "item_id": f"P{i}", "item_text": f"item {i}",
            "hard_negatives": [{"item_id": f"N{i}.{j}", "item_text": f"neg {i}.{j}"} for j in range(negatives)],
            **extra}


def test_collate_lays_out_items_then_hard_negatives_with_their_labels():
    samples = [_sample(0, 3, teacher_scores=[1.0, 2.0, 3.0, 4.0], exclude_ids=["X", "Y"]),
               _sample(1, 0, weight=2.0),
               _sample(2, 1, teacher_scores=[5.0, 6.0])]
    batch = _collate(samples, DataConfig(hard_negatives_per_query=2), _Tokens(), None)
    assert batch.keys == ["s0", "s1", "s2"] and batch.num_pairs == 3
    # At most 2 negatives per sample, in sample order, after the items.
    assert batch.tokens["item_rows"] == ["item 0", "item 1", "item 2", "neg 0.0", "neg 0.1", "neg 2.0"]
    labels = batch.labels
    assert labels.item_ids.tolist() == [stable_id(f"P{i}") for i in range(3)]
    assert labels.query_ids.tolist() == [stable_id(f"q{i}") for i in range(3)]
    assert labels.hard_negative_ids.tolist() == [stable_id(n) for n in ("N0.0", "N0.1", "N2.0")]
    assert labels.hard_negative_owner.tolist() == [0, 0, 2]
    assert labels.weights.tolist() == [1.0, 2.0, 1.0]
    assert labels.exclude_ids.tolist() == [[stable_id("X"), stable_id("Y")], [-1, -1], [-1, -1]]
    teacher = labels.teacher_scores.tolist()  # the positive's and the kept negatives' scores
    assert teacher[0] == [1.0, 2.0, 3.0] and all(math.isnan(v) for v in teacher[1])
    assert teacher[2][:2] == [5.0, 6.0] and math.isnan(teacher[2][2])
    assert batch.split_items(torch.zeros(6, 1))[1].shape == (3, 1)


def test_collate_without_tokens_or_optional_fields():
    samples = [_sample(0, 2), _sample(1, 1)]
    batch = _collate(samples, DataConfig(hard_negatives_per_query=2), None, None)
    # No tokenizer: texts only, no hard-negative rows (the raw lists stay readable).
    assert batch.tokens == {} and batch.labels.hard_negative_ids is None
    assert [len(n) for n in batch.hard_negatives] == [2, 1]
    labels = _collate(samples, DataConfig(), _Tokens(), None).labels
    assert (labels.weights, labels.exclude_ids, labels.hard_negative_ids, labels.teacher_scores) == (None,) * 4
