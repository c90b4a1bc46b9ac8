"""Catalog embedding shards and FAISS indexes: build on many ranks, search from one
(``clicktower embed`` and ``clicktower search``).

Layout of an index folder:
    embeddings-00000-of-00002.npy   float32 [rows of rank 0, D], L2-normalised by the tower
    ids-00000-of-00002.json         the item ids of those rows, in order
    index.faiss                     FAISS index over all rows, in rank order (binary for ubinary)
    index.faiss.rescore-int8.npy    ubinary with ``rescore int8``: the int8 vectors its candidates
    index.faiss.rescore-ranges.npy  are rescored against (memory-mapped) and their ranges
    items.jsonl                     item_id and item_text per row (search results show text)
    index.json                      model, dimensions, row count, bytes per item and the serving
                                    settings (size, precision, index; ``serving.ServingSettings``)
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from clicktower.launcher.retrieval.embedding import EMBED_BATCH_SIZE, embed_slice, embed_texts, rank_slice
from clicktower.launcher.retrieval.readers import load_towers, read_catalog_features, token_limits
from clicktower.launcher.retrieval.serving import (ServingSettings, atomic_save, build_index, index_bytes,
                                                   read_index, rescore_bytes, search_index, write_index)


def build_faiss_index(vectors: np.ndarray, kind: str = "flat") -> Any:
    """An inner-product FAISS index over ``vectors`` (cosine when they are normalised).

    Args:
        vectors: float32 [N, D].
        kind: an index spec (``serving.parse_index``): ``flat`` (exact), ``ivf``,
            ``ivf-pq:NLIST,M`` or ``hnsw[:M]``; full size, float32.
    """
    return build_index(vectors, ServingSettings(index=kind))


def embed_catalog(model: str, catalog: str, out: str, settings: ServingSettings = ServingSettings(),
                  batch_size: int = EMBED_BATCH_SIZE, max_length: int | None = None,
                  features_field: str = "features") -> dict[str, Any] | None:
    """Embed this rank's slice of the catalog; the main rank then builds the index.

    Runs alone or under ``accelerate launch`` / ``torchrun`` (ranks from accelerate). Every
    rank embeds its slice and writes its own embedding shard (full size, float32: the
    source for exact evaluation and rebuilds); after a barrier the main process
    concatenates them in rank order, trains the index on a seeded sample (IVF cells, PQ
    codebooks, int8 ranges) and adds every row.

    Args:
        model: ``final/`` folder or pretrained encoder folder.
        catalog: catalog file (item_id, item_text).
        out: the index folder.
        settings: size, precision and index (``ServingSettings``), recorded in index.json.
        batch_size: texts per forward pass.
        max_length: item token limit (default: the tower's own, else the model default).
        features_field: the catalog's feature vector field, read when the item tower fuses
            vectors (a bad vector: the item is embedded without it, counted).

    Returns:
        The index metadata on the main process, None on the others.
    """
    from accelerate import Accelerator

    # Accelerator, not PartialState: only it honours ACCELERATE_USE_CPU (gloo on CPU hosts).
    state = Accelerator()
    _, item_tower, tokenizer = load_towers(model)
    dim = item_tower.features_dim
    ids, texts, features = read_catalog_features(catalog, features_field if dim else None, dim)
    item_tower.to(state.device)
    rank, world = state.process_index, state.num_processes
    limit = max_length or token_limits(item_tower, item_tower)[1]
    # Each rank writes its own rows; the main process concatenates the files (no gather).
    vectors = embed_slice(item_tower, tokenizer, texts, limit, rank, world, batch_size, features,
                          progress="embed catalog").numpy()
    mine = rank_slice(len(ids), rank, world)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"{state.process_index:05d}-of-{state.num_processes:05d}"
    atomic_save(folder / f"embeddings-{tag}.npy", lambda p: np.save(p, vectors))
    atomic_save(folder / f"ids-{tag}.json", lambda p: Path(p).write_text(json.dumps(ids[mine])))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    all_vectors, all_ids = load_embedding_shards(folder, state.num_processes)
    if all_ids != ids:
        raise RuntimeError("embedding shards do not cover the catalog in order")  # a bug, not input
    started = time.perf_counter()
    index = build_index(all_vectors, settings)
    build_seconds = time.perf_counter() - started
    write_index(index, str(folder / "index.faiss"))  # atomic itself, with any rescoring files
    with open(folder / "items.jsonl.tmp", "w", encoding="utf-8") as fh:
        for item_id, text in zip(ids, texts):
            fh.write(json.dumps({"item_id": item_id, "item_text": text}, ensure_ascii=False) + "\n")
    os.replace(folder / "items.jsonl.tmp", folder / "items.jsonl")
    meta = {"model": str(model), "dim": int(settings.dim or all_vectors.shape[1]),
            "embedding_dim": int(all_vectors.shape[1]), "kind": settings.index, "num_items": len(ids),
            "num_shards": state.num_processes, "serving": settings.to_meta(),
            "bytes_per_item": round(index_bytes(index) / max(1, len(ids)), 2),
            **({"rescore_bytes_per_item": round(rescore_bytes(index) / max(1, len(ids)), 2)}
               if rescore_bytes(index) else {}),
            "build_seconds": round(build_seconds, 3)}
    if features is not None:
        meta.update(missing_features=features.num_missing, bad_features=features.bad_features)
    # index.json last: its presence means the folder is complete.
    atomic_save(folder / "index.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return meta


def load_embedding_shards(folder: Path, num_shards: int) -> tuple[np.ndarray, list[str]]:
    """Concatenate the per-rank embedding shards of an index folder, in rank order."""
    vectors, ids = [], []
    for rank in range(num_shards):
        tag = f"{rank:05d}-of-{num_shards:05d}"
        vectors.append(np.load(folder / f"embeddings-{tag}.npy"))
        ids.extend(json.loads((folder / f"ids-{tag}.json").read_text()))
    return np.concatenate(vectors), ids


class SearchIndex:
    """A built index folder: the FAISS index, its serving settings, the items and the query
    tower of its model.

    Args:
        folder: an index folder written by ``embed_catalog``.
        model: query-side model (default: the one the index was built with).
        settings: serve at other settings than the folder's (size, precision, index): the
            index is rebuilt in memory from the stored float32 embeddings.
    """

    def __init__(self, folder: str, model: str | None = None, settings: ServingSettings | None = None) -> None:
        root = Path(folder)
        if not (root / "index.json").is_file():
            raise FileNotFoundError(f"{root}: not a complete index folder (no index.json); "
                                    "build one with clicktower embed")
        self.root = root
        self.meta = json.loads((root / "index.json").read_text())
        stored = ServingSettings.from_meta(self.meta)
        self.settings = settings or stored
        built_as = ("dim", "precision", "index", "rescore", "train_sample")  # the rest: search-time options
        if all(getattr(self.settings, f) == getattr(stored, f) for f in built_as):
            self.index = read_index(str(root / "index.faiss"), stored)  # search-time options may differ
        else:
            self.index = build_index(self.vectors()[0], self.settings)
        self.items = [json.loads(line) for line in (root / "items.jsonl").read_text(encoding="utf-8").splitlines()]
        self.query_tower, _, self.tokenizer = load_towers(model or self.meta["model"])

    def vectors(self) -> tuple[np.ndarray, list[str]]:
        """The stored full-size float32 catalog embeddings and their ids."""
        return load_embedding_shards(self.root, self.meta["num_shards"])

    def embed_queries(self, queries: list[str]) -> np.ndarray:
        """Float32 [Q, D] query embeddings (the whole embedding: ``search_index`` cuts them)."""
        limit = token_limits(self.query_tower, self.query_tower)[0]
        return embed_texts(self.query_tower, self.tokenizer, queries, limit).numpy()

    def search(self, queries: list[str], k: int = 10) -> list[list[dict[str, Any]]]:
        """Top-k items for each query, best first, with scores and texts."""
        scores, rows = search_index(self.index, self.settings, self.embed_queries(queries), min(k, len(self.items)))
        return [[{**self.items[r], "score": float(s)} for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores, rows)]
