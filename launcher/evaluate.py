"""Evaluate retrieval over a catalog: exact top-k, Recall@1/10/100, MRR@10, nDCG@10.

    clicktower eval --model runs/demo/final --queries eval.jsonl --catalog catalog.jsonl

``--model`` is a trained ``final/`` folder (``query_tower/`` + ``item_tower/``) or any
pretrained encoder folder, used for both sides. The last stdout line is the JSON summary.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from clicktower.data.errors import DataError
from clicktower.data.sources import iter_records
from clicktower.launcher.errors import run_cli
from clicktower.launcher.retrieval import embed_texts, exact_topk, mean_metrics, query_metrics
from clicktower.modeling.towers import Tower, resolve_model_path


def load_towers(model: str) -> tuple[Tower, Tower, Any]:
    """Load ``(query_tower, item_tower, tokenizer)`` from a ``final/`` or an encoder folder.

    Args:
        model: folder path or ``pkg://`` reference.
    """
    from transformers import AutoTokenizer

    root = Path(resolve_model_path(model))
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such model folder")
    if (root / "query_tower").is_dir():
        query_tower, item_tower = Tower.from_pretrained(root / "query_tower"), Tower.from_pretrained(root / "item_tower")
        tokenizer = AutoTokenizer.from_pretrained(root / "query_tower")
    else:
        query_tower = item_tower = Tower.from_pretrained(root)
        tokenizer = AutoTokenizer.from_pretrained(root)
    return query_tower, item_tower, tokenizer


def read_catalog(path: str) -> tuple[list[str], list[str]]:
    """Item ids and texts of a catalog file (JSONL/CSV/Parquet with item_id, item_text)."""
    ids, texts = [], []
    for row, record in iter_records(path):
        for name in ("item_id", "item_text"):
            if name not in record:
                raise DataError(f"{path}: row {row}: missing field {name!r} (has {', '.join(record)})")
        ids.append(str(record["item_id"]))
        texts.append(str(record["item_text"]))
    return ids, texts


def read_judged_queries(path: str) -> list[tuple[str, dict[str, float]]]:
    """Queries with graded judgements: JSONL lines ``{"query", "relevance": {item_id: grade}}``."""
    out = []
    for row, record in iter_records(path):
        query, grades = record.get("query"), record.get("relevance")
        if not isinstance(query, str) or not query.strip():
            raise DataError(f"{path}: row {row}: field 'query' missing or empty")
        if not isinstance(grades, dict):
            raise DataError(f"{path}: row {row}: field 'relevance' must map item ids to grades")
        try:
            out.append((query, {str(k): float(v) for k, v in grades.items()}))
        except (TypeError, ValueError):
            raise DataError(f"{path}: row {row}: field 'relevance' has a non-numeric grade") from None
    return out


def evaluate(model: str, queries_path: str, catalog_path: str, min_relevance: float = 2.0,
             batch_size: int = 128, mode: str = "full", per_query_path: str | None = None) -> dict[str, Any]:
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
    """
    judged = read_judged_queries(queries_path)
    ids, texts = read_catalog(catalog_path)
    query_tower, item_tower, tokenizer = load_towers(model)
    return evaluate_towers(query_tower, item_tower, tokenizer, judged, ids, texts, min_relevance,
                           batch_size, mode, per_query_path)


def evaluate_towers(query_tower: Tower, item_tower: Tower, tokenizer: Any,
                    judged: list[tuple[str, dict[str, float]]], ids: list[str], texts: list[str],
                    min_relevance: float = 2.0, batch_size: int = 128, mode: str = "full",
                    per_query_path: str | None = None) -> dict[str, Any]:
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
    """
    if mode not in ("full", "rerank"):
        raise ValueError(f"unknown eval mode {mode!r}")
    q_len = getattr(query_tower, "max_length", None) or 32
    i_len = getattr(item_tower, "max_length", None) or 64
    queries = embed_texts(query_tower, tokenizer, [q for q, _ in judged], q_len, batch_size)
    if mode == "full":
        catalog = embed_texts(item_tower, tokenizer, texts, i_len, batch_size)
        _, top = exact_topk(queries, catalog, k=100)
        rankings = [[ids[i] for i in row] for row in top.tolist()]
    else:
        # Only judged items are scored: embed just those.
        position = {item_id: i for i, item_id in enumerate(ids)}
        wanted = sorted({position[i] for _, grades in judged for i in grades if i in position})
        row_of = {ids[p]: r for r, p in enumerate(wanted)}
        catalog = embed_texts(item_tower, tokenizer, [texts[p] for p in wanted], i_len, batch_size)
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
    return {"mode": mode, **mean_metrics(per_query)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clicktower eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="final/ folder or pretrained encoder folder")
    parser.add_argument("--queries", required=True, help="judged queries JSONL (query, relevance)")
    parser.add_argument("--catalog", required=True, help="catalog file (item_id, item_text)")
    parser.add_argument("--min-relevance", type=float, default=2.0, help="grade counted as relevant")
    parser.add_argument("--mode", choices=("full", "rerank"), default="full",
                        help="full-catalog retrieval, or reranking each query's judged items")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--per-query", help="write per-query metrics to this JSONL file")
    args = parser.parse_args(argv)
    summary = evaluate(args.model, args.queries, args.catalog, args.min_relevance, args.batch_size,
                       args.mode, args.per_query)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
