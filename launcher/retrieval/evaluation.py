"""Retrieval evaluation over a catalog: exact top-k, Recall@1/10/100, MRR@10, nDCG@10.

``evaluate`` loads a model (a trained ``final/`` folder, ``query_tower/`` + ``item_tower/``,
or any pretrained encoder folder used for both sides) and scores judged queries against a
catalog; ``evaluate_towers`` does the same for towers in memory.
"""
from __future__ import annotations

import json
from typing import Any

from clicktower.data.features import FeatureTable
from clicktower.launcher.retrieval.embedding import EMBED_BATCH_SIZE, embed_texts
from clicktower.launcher.retrieval.defaults import MIN_RELEVANCE
from clicktower.launcher.retrieval.metrics import cold_warm_metrics, exact_topk, mean_metrics, query_metrics
from clicktower.launcher.retrieval.readers import (load_towers, read_catalog_features, read_judged_queries,
                                                   token_limits, trained_item_ids)
from clicktower.modeling.towers import Tower


def evaluate(model: str, queries_path: str, catalog_path: str, min_relevance: float = MIN_RELEVANCE,
             batch_size: int = EMBED_BATCH_SIZE, mode: str = "full", per_query_path: str | None = None,
             features_field: str = "features", train_manifest: str | None = None,
             on_error: str = "skip", progress: bool = True) -> dict[str, Any]:
    """Load a model and judged queries, retrieve, and average the metrics.

    Args:
        model: see ``load_towers``.
        queries_path: judged queries (JSONL).
        catalog_path: the catalog to retrieve from.
        min_relevance: grade from which an item is relevant.
        batch_size: texts per forward pass.
        mode: ``full`` retrieves from the whole catalog; ``rerank`` orders each query's
            judged items only.
        per_query_path: optional JSONL of per-query metrics and top-10 ids.
        features_field: the catalog's feature vector field, read when the item tower
            fuses vectors (``model.item_features_dim``).
        train_manifest: the training shard set: adds ``cold/<metric>`` and
            ``warm/<metric>`` (``cold_warm_metrics``).
        on_error: a bad catalog vector: ``skip`` (the item is embedded without it,
            counted in ``bad_features``) or ``raise``.
        progress: progress bars of the embedding on stderr.
    """
    judged = read_judged_queries(queries_path)
    query_tower, item_tower, tokenizer = load_towers(model)
    dim = item_tower.features_dim
    ids, texts, features = read_catalog_features(catalog_path, features_field if dim else None, dim, on_error)
    trained = trained_item_ids(train_manifest) if train_manifest is not None else None
    return evaluate_towers(query_tower, item_tower, tokenizer, judged, ids, texts, min_relevance,
                           batch_size, mode, per_query_path, features, trained, progress)


def evaluate_towers(query_tower: Tower, item_tower: Tower, tokenizer: Any,
                    judged: list[tuple[str, dict[str, float]]], ids: list[str], texts: list[str],
                    min_relevance: float = MIN_RELEVANCE, batch_size: int = EMBED_BATCH_SIZE, mode: str = "full",
                    per_query_path: str | None = None, features: FeatureTable | None = None,
                    trained_items: set[str] | None = None, progress: bool = False) -> dict[str, Any]:
    """Retrieval metrics of in-memory towers (used by ``clicktower eval`` and during training).

    Args:
        query_tower: encodes the queries.
        item_tower: encodes the catalog.
        tokenizer: the towers' tokenizer.
        judged: ``(query, {item_id: grade})`` pairs.
        ids: catalog item ids.
        texts: catalog item texts.
        min_relevance: grade from which an item is relevant.
        batch_size: texts per forward pass.
        mode: ``full`` or ``rerank`` (see ``evaluate``).
        per_query_path: optional JSONL of per-query metrics and top-10 ids.
        features: the catalog items' feature vectors, row for row with ``ids``.
        trained_items: ids clicked in training: adds the cold/warm split of the metrics.
        progress: progress bars of the embedding on stderr.
    """
    if mode not in ("full", "rerank"):
        raise ValueError(f"unknown eval mode {mode!r}")
    q_len, i_len = token_limits(query_tower, item_tower)
    label = (lambda what: f"eval: embed {what}") if progress else (lambda what: None)
    queries = embed_texts(query_tower, tokenizer, [q for q, _ in judged], q_len, batch_size,
                          progress=label("queries"))
    if mode == "full":
        catalog = embed_texts(item_tower, tokenizer, texts, i_len, batch_size, features, label("catalog"))
        _, top = exact_topk(queries, catalog, k=100)
        rankings = [[ids[i] for i in row] for row in top.tolist()]
    else:
        # Only judged items are scored: embed just those.
        position = {item_id: i for i, item_id in enumerate(ids)}
        wanted = sorted({position[i] for _, grades in judged for i in grades if i in position})
        row_of = {ids[p]: r for r, p in enumerate(wanted)}
        catalog = embed_texts(item_tower, tokenizer, [texts[p] for p in wanted], i_len, batch_size,
                              features.take(wanted) if features is not None else None, label("judged items"))
        rankings = []
        for vector, (_, grades) in zip(queries, judged):
            candidates = [i for i in grades if i in row_of]
            scores = catalog[[row_of[i] for i in candidates]] @ vector
            rankings.append([candidates[j] for j in scores.argsort(descending=True).tolist()])
    per_query = [query_metrics(ranked, grades, min_relevance) for ranked, (_, grades) in zip(rankings, judged)]
    if per_query_path:
        with open(per_query_path, "w", encoding="utf-8") as fh:
            for (query, _), metrics, ranked in zip(judged, per_query, rankings):
                fh.write(json.dumps({"query": query, "metrics": metrics, "top10": ranked[:10]}) + "\n")
    summary = {"mode": mode, **mean_metrics(per_query)}
    if features is not None:
        summary.update(missing_features=features.num_missing, bad_features=features.bad_features)
    if trained_items is not None:
        summary.update(cold_warm_metrics(per_query, [g for _, g in judged], trained_items, min_relevance))
    return summary
