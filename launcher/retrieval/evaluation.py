"""Retrieval evaluation over a catalog: exact top-k, Recall@1/10/100, MRR@10, nDCG@10.

``evaluate`` loads a model (a trained ``final/`` folder, ``query_tower/`` + ``item_tower/``,
or any pretrained encoder folder used for both sides) and scores judged queries against a
catalog; ``evaluate_towers`` does the same for towers in memory. With serving settings (a
size, precision, index) or a built index folder (``evaluate_index``), ``index/<metric>`` and
the index's recall@10 against exact search, bytes per item and latency join the exact ones.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from clicktower.data.features import FeatureTable
from clicktower.launcher.retrieval.embedding import EMBED_BATCH_SIZE, embed_texts
from clicktower.launcher.progress import status
from clicktower.launcher.retrieval.defaults import MIN_RELEVANCE
from clicktower.launcher.retrieval.faiss_index import SearchIndex
from clicktower.launcher.retrieval.metrics import cold_warm_metrics, exact_topk, mean_metrics, query_metrics
from clicktower.launcher.retrieval.readers import (load_towers, read_catalog_features, read_judged_queries,
                                                   token_limits, trained_item_ids)
from clicktower.launcher.retrieval.serving import (ServingSettings, build_index, index_bytes, latency_ms,
                                                   overlap_at_k, prepare, rescore_bytes, search_index)
from clicktower.modeling.towers import Tower


def evaluate(model: str, queries_path: str, catalog_path: str, min_relevance: float = MIN_RELEVANCE,
             batch_size: int = EMBED_BATCH_SIZE, mode: str = "full", per_query_path: str | None = None,
             features_field: str = "features", train_manifest: str | None = None,
             on_error: str = "skip", *, progress: bool = True,
             settings: ServingSettings | None = None) -> dict[str, Any]:
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
        settings: also retrieve through an index built in memory at these settings
            (``index/...`` keys, see ``index_report``; mode ``full`` only).
    """
    judged = read_judged_queries(queries_path)
    query_tower, item_tower, tokenizer = load_towers(model)
    dim = item_tower.features_dim
    ids, texts, features = read_catalog_features(catalog_path, features_field if dim else None, dim, on_error)
    trained = trained_item_ids(train_manifest) if train_manifest is not None else None
    return evaluate_towers(query_tower, item_tower, tokenizer, judged, ids, texts, min_relevance,
                           batch_size, mode, per_query_path, features, trained, progress=progress,
                           settings=settings)


def evaluate_towers(query_tower: Tower, item_tower: Tower, tokenizer: Any,
                    judged: list[tuple[str, dict[str, float]]], ids: list[str], texts: list[str],
                    min_relevance: float = MIN_RELEVANCE, batch_size: int = EMBED_BATCH_SIZE, mode: str = "full",
                    per_query_path: str | None = None, features: FeatureTable | None = None,
                    trained_items: set[str] | None = None, *, progress: bool = False,
                    settings: ServingSettings | None = None) -> dict[str, Any]:
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
        settings: serving settings to report ``index_report`` for (mode ``full``).
    """
    if mode not in ("full", "rerank"):
        raise ValueError(f"unknown eval mode {mode!r}")
    if settings is not None and mode != "full":
        raise ValueError("serving settings (--dim/--precision/--index-type) need --mode full")
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
    if settings is not None:
        summary.update(index_report(build_index(catalog.numpy(), settings), settings, queries.numpy(),
                                    catalog.numpy(), ids, judged, min_relevance))
    return summary


def evaluate_index(folder: str, queries_path: str, model: str | None = None, min_relevance: float = MIN_RELEVANCE,
                   per_query_path: str | None = None) -> dict[str, Any]:
    """Exact metrics from an index folder's stored float32 embeddings, and the same through
    its built index with its recorded settings (``index_report``); no catalog re-embedding.

    Args:
        folder: an index folder from ``clicktower embed``.
        queries_path: judged queries (JSONL).
        model: query model (default: the index's).
        min_relevance: grade from which an item is relevant.
        per_query_path: optional JSONL of per-query exact metrics and top-10 ids.
    """
    judged = read_judged_queries(queries_path)
    served = SearchIndex(folder, model)
    catalog, ids = served.vectors()
    status(f"eval: index {folder} ({len(ids)} items, {served.settings.index}, {served.settings.precision}): "
           f"{len(judged)} queries, exact search, then the index and its latency")
    queries = served.embed_queries([q for q, _ in judged])
    _, top = exact_topk(torch.from_numpy(queries), torch.from_numpy(catalog), k=100)
    rankings = [[ids[i] for i in row] for row in top.tolist()]
    per_query = [query_metrics(ranked, grades, min_relevance) for ranked, (_, grades) in zip(rankings, judged)]
    if per_query_path:
        with open(per_query_path, "w", encoding="utf-8") as fh:
            for (query, _), metrics, ranked in zip(judged, per_query, rankings):
                fh.write(json.dumps({"query": query, "metrics": metrics, "top10": ranked[:10]}) + "\n")
    summary = {"mode": "full", **mean_metrics(per_query)}
    summary.update(index_report(served.index, served.settings, queries, catalog, ids, judged, min_relevance))
    return summary


def index_report(index: Any, settings: ServingSettings, queries: np.ndarray, catalog: np.ndarray, ids: list[str],
                 judged: list[tuple[str, dict[str, float]]], min_relevance: float) -> dict[str, Any]:
    """What serving through ``index`` costs against exact float32 search of the whole embedding.

    ``index/<metric>``: the retrieval metrics of the index's top 100; ``index/recall@10_vs_exact``:
    the share of the exact float32 top 10 at the served size that the index returns;
    ``index/bytes_per_item``: its serialised size per item (what serving holds in memory;
    ``index/rescore_bytes_per_item``: the int8 rescoring vectors kept beside it on disk, when
    ``rescore`` is ``int8``); ``index/latency_p50_ms`` /
    ``_p99_ms``: one-query searches over the queries; ``index/settings``.

    Args:
        index: the built index.
        settings: its settings.
        queries: float32 [Q, D] query embeddings (whole size).
        catalog: float32 [N, D] catalog embeddings (whole size), row for row with ``ids``.
        ids: catalog item ids.
        judged: the queries' judgements.
        min_relevance: grade from which an item is relevant.
    """
    _, rows = search_index(index, settings, queries, 100)
    rankings = [[ids[r] for r in row if r >= 0] for row in rows.tolist()]
    metrics = mean_metrics([query_metrics(r, grades, min_relevance) for r, (_, grades) in zip(rankings, judged)])
    out = {f"index/{key}": value for key, value in metrics.items() if not key.startswith("num_")}
    _, exact = exact_topk(torch.from_numpy(prepare(queries, settings.dim)),
                          torch.from_numpy(prepare(catalog, settings.dim)), k=10)
    out["index/recall@10_vs_exact"] = overlap_at_k(rows, exact.numpy())
    out["index/bytes_per_item"] = round(index_bytes(index) / max(1, len(ids)), 2)
    if rescore_bytes(index):
        out["index/rescore_bytes_per_item"] = round(rescore_bytes(index) / max(1, len(ids)), 2)
    out.update({f"index/latency_{key}": round(value, 4) for key, value in latency_ms(index, settings, queries).items()})
    out["index/settings"] = settings.to_meta()
    return out
