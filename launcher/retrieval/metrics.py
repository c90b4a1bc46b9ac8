"""Exact top-k search and retrieval metrics: Recall@k, MRR@10, nDCG@10."""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch

# The metrics every evaluation reports (and ``eval.metric`` may select from).
METRIC_NAMES = ("recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10")


def exact_topk(queries: torch.Tensor, catalog: torch.Tensor, k: int,
               chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k, in query chunks so memory stays chunk x catalog.

    Args:
        queries: [Q, D].
        catalog: [C, D].
        k: neighbours per query (clipped to C).

    Returns:
        ``(scores [Q, k], indices [Q, k])``, best first.
    """
    k = min(k, catalog.shape[0])
    scores, indices = [], []
    for start in range(0, queries.shape[0], chunk):
        s, i = (queries[start:start + chunk] @ catalog.T).topk(k, dim=1)
        scores.append(s)
        indices.append(i)
    return torch.cat(scores), torch.cat(indices)


def query_metrics(ranked: Sequence[str], grades: dict[str, float], min_relevance: float,
                  ks: Iterable[int] = (1, 10, 100)) -> dict[str, float] | None:
    """Recall@k, MRR@10 and nDCG@10 of one ranked list against graded judgements.

    Recall@k is the share of relevant items (grade >= ``min_relevance``) in the top k.
    MRR@10 is 1 / rank of the first relevant item in the top 10 (0 if none). nDCG@10 uses
    gains ``2**grade - 1`` and the ideal order of all judged grades; unjudged items gain 0.

    Args:
        ranked: retrieved item ids, best first.
        grades: judged item id -> graded relevance.
        min_relevance: the grade from which an item counts as relevant.
        ks: the recall cut-offs.

    Returns:
        The metrics, or None when the query has no relevant item (it is left out of means).
    """
    relevant = {item for item, g in grades.items() if g >= min_relevance}
    if not relevant:
        return None
    out = {f"recall@{k}": len(relevant.intersection(ranked[:k])) / len(relevant) for k in ks}
    out["mrr@10"] = next((1.0 / (r + 1) for r, item in enumerate(ranked[:10]) if item in relevant), 0.0)
    dcg = sum((2.0 ** grades.get(item, 0.0) - 1.0) / math.log2(r + 2) for r, item in enumerate(ranked[:10]))
    ideal = sorted(grades.values(), reverse=True)[:10]
    idcg = sum((2.0 ** g - 1.0) / math.log2(r + 2) for r, g in enumerate(ideal))
    out["ndcg@10"] = dcg / idcg if idcg > 0 else 0.0
    return out


def mean_metrics(per_query: list[dict[str, float] | None]) -> dict[str, Any]:
    """Average per-query metrics over the queries that have a relevant item.

    Args:
        per_query: results of ``query_metrics`` (None for queries without relevant items).
    """
    scored = [m for m in per_query if m is not None]
    summary: dict[str, Any] = {}
    if scored:
        summary = {key: sum(m[key] for m in scored) / len(scored) for key in scored[0]}
    summary["num_queries"] = len(scored)
    summary["num_queries_without_relevant"] = len(per_query) - len(scored)
    return summary


def cold_warm_metrics(per_query: list[dict[str, float] | None], judgements: Sequence[dict[str, float]],
                      trained_items: set[str], min_relevance: float) -> dict[str, Any]:
    """Split the per-query metrics into cold and warm queries and average each part.

    A query is cold when none of its relevant items (grade >= ``min_relevance``) was ever a
    positive in training (``trained_items``): only the items' content can find them. Every
    other query with a relevant item is warm.

    Args:
        per_query: results of ``query_metrics``, one per query.
        judgements: each query's ``{item_id: grade}``, in the same order.
        trained_items: ids of every item clicked in the training set.
        min_relevance: the grade from which an item counts as relevant.

    Returns:
        ``cold/<metric>`` and ``warm/<metric>`` means, with ``cold/num_queries`` and
        ``warm/num_queries`` (a part without queries has its count only).
    """
    parts: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    for metrics, grades in zip(per_query, judgements):
        if metrics is None:
            continue
        relevant = [item for item, g in grades.items() if g >= min_relevance]
        parts["warm" if trained_items.intersection(relevant) else "cold"].append(metrics)
    out: dict[str, Any] = {}
    for name, rows in parts.items():
        summary = mean_metrics(rows)
        out.update({f"{name}/{key}": value for key, value in summary.items()
                    if key != "num_queries_without_relevant"})
    return out
