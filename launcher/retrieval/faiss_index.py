"""Catalog embedding shards and FAISS indexes: build on many ranks, search from one
(``clicktower embed`` and ``clicktower search``).

Layout of an index folder:
    embeddings-00000-of-00002.npy   float32 [rows of rank 0, D], L2-normalised by the tower
    ids-00000-of-00002.json         the item ids of those rows, in order
    index.faiss                     FAISS inner-product index over all rows, in rank order
    items.jsonl                     item_id and item_text per row (search results show text)
    index.json                      model, dimension, index kind, row count
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clicktower.launcher.retrieval.embedding import EMBED_BATCH_SIZE, embed_slice, embed_texts, rank_slice
from clicktower.launcher.retrieval.readers import load_towers, read_catalog_features, token_limits

IndexKind = Literal["flat", "ivf", "hnsw"]


def build_faiss_index(vectors: np.ndarray, kind: IndexKind = "flat", nlist: int | None = None,
                      hnsw_m: int = 32) -> Any:
    """An inner-product FAISS index over ``vectors`` (cosine when they are normalised).

    Args:
        vectors: float32 [N, D].
        kind: ``flat`` (exact), ``ivf`` (inverted lists, for millions of items) or ``hnsw``
            (graph, no training).
        nlist: IVF cells (default about 4 * sqrt(N)).
        hnsw_m: HNSW neighbours per node.
    """
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = nlist or max(1, min(len(vectors) // 39, int(4 * np.sqrt(len(vectors)))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = max(1, nlist // 8)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    index.add(vectors)
    return index


def embed_catalog(model: str, catalog: str, out: str, index_kind: IndexKind = "flat",
                  batch_size: int = EMBED_BATCH_SIZE, max_length: int | None = None,
                  features_field: str = "features") -> dict[str, Any] | None:
    """Embed this rank's slice of the catalog; the main rank then builds the index.

    Runs alone or under ``accelerate launch`` / ``torchrun`` (ranks from accelerate). Every rank writes its own embedding shard; after a barrier the main
    process concatenates them in rank order and writes the FAISS index.

    Args:
        model: ``final/`` folder or pretrained encoder folder.
        catalog: catalog file (item_id, item_text).
        out: the index folder.
        index_kind: see ``build_faiss_index``.
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
    _atomic_save(folder / f"embeddings-{tag}.npy", lambda p: np.save(p, vectors))
    _atomic_save(folder / f"ids-{tag}.json", lambda p: Path(p).write_text(json.dumps(ids[mine])))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    all_vectors, all_ids = load_embedding_shards(folder, state.num_processes)
    if all_ids != ids:
        raise RuntimeError("embedding shards do not cover the catalog in order")  # a bug, not input
    import faiss

    index = build_faiss_index(all_vectors, index_kind)
    _atomic_save(folder / "index.faiss", lambda p: faiss.write_index(index, str(p)))
    with open(folder / "items.jsonl.tmp", "w", encoding="utf-8") as fh:
        for item_id, text in zip(ids, texts):
            fh.write(json.dumps({"item_id": item_id, "item_text": text}, ensure_ascii=False) + "\n")
    os.replace(folder / "items.jsonl.tmp", folder / "items.jsonl")
    meta = {"model": str(model), "dim": int(all_vectors.shape[1]), "kind": index_kind,
            "num_items": len(ids), "num_shards": state.num_processes}
    if features is not None:
        meta.update(missing_features=features.num_missing, bad_features=features.bad_features)
    # index.json last: its presence means the folder is complete.
    _atomic_save(folder / "index.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return meta


def load_embedding_shards(folder: Path, num_shards: int) -> tuple[np.ndarray, list[str]]:
    """Concatenate the per-rank embedding shards of an index folder, in rank order."""
    vectors, ids = [], []
    for rank in range(num_shards):
        tag = f"{rank:05d}-of-{num_shards:05d}"
        vectors.append(np.load(folder / f"embeddings-{tag}.npy"))
        ids.extend(json.loads((folder / f"ids-{tag}.json").read_text()))
    return np.concatenate(vectors), ids


def _atomic_save(path: Path, write) -> None:
    # np.save appends ".npy" to names without it, so the temporary name keeps the suffix.
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(tmp)
    os.replace(tmp, path)


class SearchIndex:
    """A built index folder: the FAISS index, the items and the query tower of its model.

    Args:
        folder: an index folder written by ``embed_catalog``.
        model: query-side model (default: the one the index was built with).
    """

    def __init__(self, folder: str, model: str | None = None) -> None:
        import faiss

        root = Path(folder)
        if not (root / "index.json").is_file():
            raise FileNotFoundError(f"{root}: not a complete index folder (no index.json); "
                                    "build one with clicktower embed")
        self.meta = json.loads((root / "index.json").read_text())
        self.index = faiss.read_index(str(root / "index.faiss"))
        self.items = [json.loads(line) for line in (root / "items.jsonl").read_text(encoding="utf-8").splitlines()]
        self.query_tower, _, self.tokenizer = load_towers(model or self.meta["model"])

    def search(self, queries: list[str], k: int = 10) -> list[list[dict[str, Any]]]:
        """Top-k items for each query, best first, with scores and texts."""
        limit = token_limits(self.query_tower, self.query_tower)[0]
        vectors = embed_texts(self.query_tower, self.tokenizer, queries, limit).numpy()
        scores, rows = self.index.search(np.ascontiguousarray(vectors), min(k, len(self.items)))
        return [[{**self.items[r], "score": float(s)} for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores, rows)]
