"""Evaluate retrieval over a catalog: exact top-k, Recall@k, MRR@10, nDCG@10.

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
             batch_size: int = 128, max_query_length: int | None = None,
             max_item_length: int | None = None, per_query_path: str | None = None) -> dict[str, Any]:
    """Embed catalog and queries, retrieve exactly, and average the metrics.

    Args:
        model: see ``load_towers``.
        queries_path: judged queries (JSONL).
        catalog_path: the catalog to retrieve from.
        min_relevance: grade from which an item is relevant.
        batch_size: texts per forward pass.
        max_query_length: query token limit (default: the tower's own, else 32).
        max_item_length: item token limit (default: the tower's own, else 64).
        per_query_path: optional JSONL of per-query metrics and top-10 ids.
    """
    judged = read_judged_queries(queries_path)
    ids, texts = read_catalog(catalog_path)
    query_tower, item_tower, tokenizer = load_towers(model)
    q_len = max_query_length or getattr(query_tower, "max_length", None) or 32
    i_len = max_item_length or getattr(item_tower, "max_length", None) or 64
    catalog = embed_texts(item_tower, tokenizer, texts, i_len, batch_size)
    queries = embed_texts(query_tower, tokenizer, [q for q, _ in judged], q_len, batch_size)
    _, top = exact_topk(queries, catalog, k=100)
    per_query = []
    for (query, grades), row in zip(judged, top.tolist()):
        per_query.append(query_metrics([ids[i] for i in row], grades, min_relevance))
    if per_query_path:
        with open(per_query_path, "w", encoding="utf-8") as fh:
            for (query, _), metrics, row in zip(judged, per_query, top.tolist()):
                fh.write(json.dumps({"query": query, "metrics": metrics, "top10": [ids[i] for i in row[:10]]}) + "\n")
    return mean_metrics(per_query)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clicktower eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="final/ folder or pretrained encoder folder")
    parser.add_argument("--queries", required=True, help="judged queries JSONL (query, relevance)")
    parser.add_argument("--catalog", required=True, help="catalog file (item_id, item_text)")
    parser.add_argument("--min-relevance", type=float, default=2.0, help="grade counted as relevant")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--per-query", help="write per-query metrics to this JSONL file")
    args = parser.parse_args(argv)
    summary = evaluate(args.model, args.queries, args.catalog, args.min_relevance, args.batch_size,
                       per_query_path=args.per_query)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
