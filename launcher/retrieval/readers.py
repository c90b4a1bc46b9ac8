"""Reading what retrieval needs: a model's towers, a catalog, judged queries."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from clicktower.data.errors import DataError
from clicktower.data.sources import iter_records
from clicktower.modeling.towers import (DEFAULT_MAX_ITEM_LENGTH, DEFAULT_MAX_QUERY_LENGTH, Tower,
                                        resolve_model_path)


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
    """Item ids and texts of a catalog file (JSONL/CSV/Parquet with item_id, item_text), a
    local path or a URL (``s3://...``, ``https://...``: read through ``clicktower.data``)."""
    ids, texts = [], []
    for row, record in iter_records(path):
        for name in ("item_id", "item_text"):
            if name not in record:
                raise DataError(f"{path}: row {row}: missing field {name!r} (has {', '.join(record)})")
        ids.append(str(record["item_id"]))
        texts.append(str(record["item_text"]))
    return ids, texts


def read_judged_queries(path: str) -> list[tuple[str, dict[str, float]]]:
    """Queries with graded judgements: JSONL lines ``{"query", "relevance": {item_id: grade}}``
    (a local path or a URL, as ``read_catalog``)."""
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


def token_limits(query_tower: Tower, item_tower: Tower) -> tuple[int, int]:
    """``(query, item)`` token limits of loaded towers: those they were trained with, else
    the model config's defaults (a plain encoder folder records none).

    Args:
        query_tower: the query tower.
        item_tower: the item tower.
    """
    return (query_tower.max_length or DEFAULT_MAX_QUERY_LENGTH,
            item_tower.max_length or DEFAULT_MAX_ITEM_LENGTH)
