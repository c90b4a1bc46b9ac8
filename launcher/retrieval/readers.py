"""Reading what retrieval needs: a model's towers, a catalog, judged queries."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from clicktower.data.errors import DataError
from clicktower.data.features import BadFeatures, FeatureTable, check_vector, is_missing
from clicktower.data.sources import iter_records
from clicktower.modeling.towers import DEFAULT_MAX_ITEM_LENGTH, DEFAULT_MAX_QUERY_LENGTH, Tower, download_model

log = logging.getLogger("clicktower")


def load_towers(model: str) -> tuple[Tower, Tower, Any]:
    """Load ``(query_tower, item_tower, tokenizer)`` from a ``final/`` or an encoder folder.

    Args:
        model: folder path, ``pkg://`` reference or Hugging Face Hub id (downloaded when
            not cached, unless offline).
    """
    from transformers import AutoTokenizer

    root = Path(download_model(model))
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
    ids, texts, _ = read_catalog_features(path)
    return ids, texts


def read_catalog_features(path: str, field: str | None = None, dim: int | None = None,
                          on_error: str = "skip") -> tuple[list[str], list[str], FeatureTable | None]:
    """``read_catalog`` plus each item's feature vector (for an item tower that fuses them).

    A row whose ``field`` is absent or null has no vector (the model's "missing" embedding
    stands in). A bad vector (wrong length, NaN or inf, not numbers) raises with
    ``on_error="raise"``; with ``"skip"`` the item stays, without its vector, and is counted.

    Args:
        path: the catalog (path or URL).
        field: the feature vector field (None: read no vectors).
        dim: the length the model expects.
        on_error: ``"skip"`` or ``"raise"`` (as ``data.on_error``).

    Returns:
        ``(ids, texts, table)``; the table is None when ``field`` is None. Its
        ``bad_features`` attribute counts the vectors dropped by ``"skip"``.
    """
    ids, texts, vectors, bad = [], [], [], 0
    for row, record in iter_records(path):
        for name in ("item_id", "item_text"):
            if name not in record:
                raise DataError(f"{path}: row {row}: missing field {name!r} (has {', '.join(record)})")
        ids.append(str(record["item_id"]))
        texts.append(str(record["item_text"]))
        if field is None:
            continue
        value, vector = record.get(field), None
        if not is_missing(value):
            try:
                vector = check_vector(value, dim)
            except BadFeatures as exc:
                if on_error == "raise":
                    raise DataError(f"{path}: row {row}: item {ids[-1]!r}: field {field!r}: {exc} "
                                    f"(on_error=raise; 'skip' embeds the item without it)") from None
                bad += 1
                if bad <= 3:
                    log.warning("%s: row %d: item %r: bad %r vector, embedded without it: %s",
                                path, row, ids[-1], field, exc)
        vectors.append(vector)
    if field is None:
        return ids, texts, None
    table = FeatureTable.from_rows(vectors, dim or next((len(v) for v in vectors if v is not None), 1))
    return ids, texts, FeatureTable(table.values, table.present, bad)


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


def trained_item_ids(manifest: str) -> set[str]:
    """Ids of every item that is a positive (the clicked item) of a training shard set.

    Args:
        manifest: ``manifest.json`` or its folder (path or URL), as ``clicktower shard`` wrote it.
    """
    from clicktower.data.shards import iter_shard, load_manifest

    loaded = load_manifest(manifest)
    return {str(sample["item_id"]) for shard in loaded["shards"] for sample in iter_shard(shard["path"])}
