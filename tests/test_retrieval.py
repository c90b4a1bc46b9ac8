"""Retrieval metrics against hand-computed cases, and exact top-k."""
from __future__ import annotations

import math

import pytest
import torch

from clicktower.launcher.retrieval.metrics import exact_topk, mean_metrics, query_metrics

pytestmark = pytest.mark.unit


def test_metrics_by_hand():
    grades = {"a": 3, "b": 2, "c": 1}
    ranked = ["x", "b", "y", "a"] + [f"z{i}" for i in range(100)]
    m = query_metrics(ranked, grades, min_relevance=2)
    assert m["recall@1"] == 0.0 and m["recall@10"] == 1.0 and m["recall@100"] == 1.0
    assert m["mrr@10"] == pytest.approx(1 / 2)
    dcg = (2 ** 2 - 1) / math.log2(3) + (2 ** 3 - 1) / math.log2(5)
    idcg = (2 ** 3 - 1) / 1 + (2 ** 2 - 1) / math.log2(3) + (2 ** 1 - 1) / 2
    assert m["ndcg@10"] == pytest.approx(dcg / idcg)


def test_partial_recall_and_no_relevant_query():
    m = query_metrics(["a", "q"] + ["n"] * 20, {"a": 3, "b": 3}, min_relevance=2)
    assert m["recall@1"] == 0.5 and m["recall@10"] == 0.5 and m["mrr@10"] == 1.0
    assert query_metrics(["a"], {"a": 1}, min_relevance=2) is None
    summary = mean_metrics([m, None, {k: 0.0 for k in m}])
    assert summary["num_queries"] == 2 and summary["num_queries_without_relevant"] == 1
    assert summary["recall@1"] == pytest.approx(0.25)


def test_exact_topk_matches_full_sort():
    torch.manual_seed(0)
    q, c = torch.randn(37, 8), torch.randn(300, 8)
    scores, idx = exact_topk(q, c, k=10, chunk=16)
    full = (q @ c.T).argsort(dim=1, descending=True)[:, :10]
    assert torch.equal(idx, full)
    assert scores.shape == (37, 10)
