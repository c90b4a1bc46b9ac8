"""Mine hard negatives with a trained model and write them into a new shard set.

(``clicktower mine``.) For every sample of the manifest: retrieve its query's nearest items over the pool (the
manifest's own items, plus ``--catalog`` when given), keep the candidates ranked inside the
window ``--ranks START END`` (1-based, inclusive: the very top is mostly unlabelled
positives), drop every candidate that

* is the sample's own item, or shares its id or its text (the same product twice);
* is a clicked item of the same query in the manifest (a positive of that query);
* scores above ``positive score - margin`` (likely a false negative: an item the model
  finds as good as the clicked one is more often an unlabelled positive than a negative),

and attach the first ``--negatives`` survivors, best first, as the sample's
``hard_negatives``. The new set is written with the project's shard writer (manifest last,
atomic); training uses it with ``data.hard_negatives_per_query``. Under ``accelerate
launch`` every rank embeds its slice of the pool and of the queries; the main process
ranks, filters and writes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from clicktower.data.errors import DataError
from clicktower.data.shards import iter_shard, load_manifest, write_shards
from clicktower.data.sources import FieldMap
from clicktower.data.storage import Storage, is_url, join
from clicktower.launcher.retrieval.embedding import EMBED_BATCH_SIZE, embed_sharded
from clicktower.launcher.retrieval.metrics import exact_topk
from clicktower.launcher.retrieval.readers import load_towers, read_catalog, token_limits

# Sample fields carried over unchanged (besides query, item_id, item_text, hard_negatives).
_PASSTHROUGH = ("label", "weight", "features")


def iter_manifest_samples(manifest: dict) -> Iterator[dict]:
    """Every sample of a loaded manifest, shard by shard, in file order.

    Args:
        manifest: a manifest from ``load_manifest``.
    """
    for shard in manifest["shards"]:
        yield from iter_shard(shard["path"])


def mine_negatives(query_emb: torch.Tensor, pool_emb: torch.Tensor, pool_ids: Sequence[str],
                   pool_texts: Sequence[str], samples: Sequence[dict], query_row: Sequence[int],
                   positive_row: Sequence[int], query_positives: Sequence[set[str]],
                   ranks: tuple[int, int] = (10, 100), margin: float = 0.05,
                   negatives: int = 5) -> list[list[dict]]:
    """The mined hard negatives of each sample (pure: embeddings in, item lists out).

    Args:
        query_emb: [Q, D] embeddings of the distinct queries.
        pool_emb: [P, D] embeddings of the candidate pool.
        pool_ids: item id of each pool row.
        pool_texts: item text of each pool row.
        samples: the samples (``item_id``, ``item_text`` are read).
        query_row: row of each sample's query in ``query_emb``.
        positive_row: row of each sample's own item in ``pool_emb``.
        query_positives: for each query row, the ids of every item clicked for it.
        ranks: 1-based inclusive rank window of candidates kept.
        margin: drop candidates scoring above the positive's score minus this.
        negatives: at most this many negatives per sample, best first.

    Returns:
        One list of ``{"item_id", "item_text", "score"}`` per sample.
    """
    start, end = ranks
    k = min(end, pool_emb.shape[0])
    scores, rows = exact_topk(query_emb, pool_emb, k)
    positive_scores = (query_emb[list(query_row)] * pool_emb[list(positive_row)]).sum(-1).tolist()
    out = []
    for sample, q, pos_score in zip(samples, query_row, positive_scores):
        own_id, own_text = str(sample["item_id"]), _norm(sample["item_text"])
        clicked = query_positives[q]
        mined: list[dict] = []
        for score, row in zip(scores[q, start - 1:k].tolist(), rows[q, start - 1:k].tolist()):
            if score > pos_score - margin:
                continue  # too close to (or above) the positive: likely an unlabelled positive
            item_id = pool_ids[row]
            if item_id == own_id or item_id in clicked or _norm(pool_texts[row]) == own_text:
                continue
            mined.append({"item_id": item_id, "item_text": pool_texts[row], "score": round(score, 6)})
            if len(mined) == negatives:
                break
        out.append(mined)
    return out


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def mine(model: str, manifest_path: str, out: str, catalog: str | None = None,
         ranks: tuple[int, int] = (10, 100), margin: float = 0.05, negatives: int = 5,
         keep_existing: bool = False, batch_size: int = EMBED_BATCH_SIZE, shard_size: int | None = None,
         overwrite: bool = False) -> dict[str, Any] | None:
    """Mine hard negatives for every sample of a manifest and write a new shard set.

    Args:
        model: ``final/`` folder or pretrained encoder folder.
        manifest_path: the input ``manifest.json`` or its folder (path or URL).
        out: the output shard folder or URL (must not exist unless ``overwrite``).
        catalog: optional extra candidate items (``item_id``, ``item_text``; path or URL).
        ranks: 1-based inclusive rank window of kept candidates.
        margin: drop candidates scoring above the positive's score minus this.
        negatives: hard negatives per sample.
        keep_existing: put the sample's existing hard negatives first, mined ones after.
        batch_size: texts per forward pass.
        shard_size: samples per output shard (default: the input's).
        overwrite: replace an existing output shard folder.

    Returns:
        A summary on the main process, None on the others.
    """
    from accelerate import Accelerator

    if not 1 <= ranks[0] <= ranks[1]:
        raise DataError(f"--ranks {ranks[0]} {ranks[1]}: need 1 <= START <= END")
    if negatives < 1:
        raise DataError(f"--negatives {negatives}: must be >= 1")
    if not is_url(out) and Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        raise DataError(f"{out}: output exists and is not empty; pass --overwrite to replace it")
    manifest = load_manifest(manifest_path)
    samples = list(iter_manifest_samples(manifest))
    pool: dict[str, str] = {}
    if catalog is not None:
        for item_id, text in zip(*read_catalog(catalog)):
            pool.setdefault(item_id, text)
    for s in samples:  # every positive is in the pool (its score is needed), first text wins
        pool.setdefault(str(s["item_id"]), s["item_text"])
    pool_ids, pool_texts = list(pool), list(pool.values())
    query_of: dict[str, int] = {}
    for s in samples:
        query_of.setdefault(s["query"], len(query_of))
    queries = list(query_of)

    state = Accelerator()  # honours ACCELERATE_USE_CPU (gloo) like clicktower embed
    query_tower, item_tower, tokenizer = load_towers(model)
    query_tower.to(state.device)
    item_tower.to(state.device)
    q_len, i_len = token_limits(query_tower, item_tower)
    world = state.num_processes
    query_emb = embed_sharded(query_tower, tokenizer, queries, q_len, state.device, batch_size)
    pool_emb = embed_sharded(item_tower, tokenizer, pool_texts, i_len, state.device, batch_size)
    if not state.is_main_process:
        state.wait_for_everyone()
        return None

    pool_row = {item_id: i for i, item_id in enumerate(pool_ids)}
    query_row = [query_of[s["query"]] for s in samples]
    positives: list[set[str]] = [set() for _ in queries]
    for s, q in zip(samples, query_row):
        positives[q].add(str(s["item_id"]))
    mined = mine_negatives(query_emb, pool_emb, pool_ids, pool_texts, samples, query_row,
                           [pool_row[str(s["item_id"])] for s in samples], positives, ranks, margin,
                           negatives)
    summary = _write(samples, mined, manifest, out, keep_existing, shard_size, overwrite)
    summary.update({"model": str(model), "manifest": str(manifest_path), "pool_items": len(pool_ids),
                    "queries": len(queries), "ranks": list(ranks), "margin": margin,
                    "negatives_per_sample": negatives, "num_processes": world})
    Storage().write_bytes(join(out, "mining.json"), (json.dumps(summary, indent=2) + "\n").encode())
    state.wait_for_everyone()
    return summary


def _write(samples: list[dict], mined: list[list[dict]], manifest: dict, out: str,
           keep_existing: bool, shard_size: int | None, overwrite: bool) -> dict[str, Any]:
    """Write the samples with their negatives as JSONL, then shard it with ``write_shards``."""
    fields = set(manifest.get("fields") or ())
    # The samples go through a JSONL file next to a local output (same disk), or in a
    # temporary folder for a URL output (s3://...).
    tmp = Path(tempfile.mkdtemp(prefix="clicktower-mine-") if is_url(out)
               else f"{out.rstrip(os.sep)}.mine-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        jsonl = tmp / "samples.jsonl"
        with_negatives = 0
        with open(jsonl, "w", encoding="utf-8") as fh:
            for s, negs in zip(samples, mined):
                negs = [{"item_id": n["item_id"], "item_text": n["item_text"]} for n in negs]
                if keep_existing:
                    negs = list(s.get("hard_negatives") or []) + negs
                with_negatives += bool(negs)
                record = {"query": s["query"], "item_id": s["item_id"], "item_text": s["item_text"],
                          "hard_negatives": negs}
                for name in _PASSTHROUGH:
                    if name in s:
                        value = s[name]
                        record[name] = value.tolist() if hasattr(value, "tolist") else value
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        field_map = FieldMap(hard_negatives="hard_negatives",
                             label="label" if "label" in fields else None,
                             weight="weight" if "weight" in fields else None,
                             features="features" if "features" in fields else None)
        written = write_shards([str(jsonl)], out, field_map,
                               shard_size=shard_size or int(manifest.get("shard_size") or 100_000),
                               overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "num_samples": written["num_samples"], "num_shards": len(written["shards"]),
            "samples_with_negatives": with_negatives,
            "mean_mined_per_sample": round(sum(map(len, mined)) / max(1, len(mined)), 3)}
