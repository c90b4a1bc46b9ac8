"""Mine hard negatives with a trained model and write them into a new shard set.

    clicktower mine --model runs/x/final --manifest data/shards --out data/shards_mined
    accelerate launch -m clicktower.launcher.mine --model ... --manifest ... --out ...

For every sample of the manifest: retrieve its query's nearest items over the pool (the
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

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from clicktower.data.errors import DataError
from clicktower.data.shards import iter_shard, load_manifest, write_shards
from clicktower.data.sources import FieldMap
from clicktower.launcher.errors import run_cli

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
    scores, rows = _topk(query_emb, pool_emb, k)
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


def _topk(queries: torch.Tensor, pool: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    from clicktower.launcher.retrieval import exact_topk

    return exact_topk(queries, pool, k)


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def mine(model: str, manifest_path: str, out: str, catalog: str | None = None,
         ranks: tuple[int, int] = (10, 100), margin: float = 0.05, negatives: int = 5,
         keep_existing: bool = False, batch_size: int = 128, shard_size: int | None = None,
         overwrite: bool = False) -> dict[str, Any] | None:
    """Mine hard negatives for every sample of a manifest and write a new shard set.

    Args:
        model: ``final/`` folder or pretrained encoder folder.
        manifest_path: the input ``manifest.json`` or its folder.
        out: the output shard folder (must not exist unless ``overwrite``).
        catalog: optional extra candidate items (``item_id``, ``item_text``).
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

    from clicktower.launcher.evaluate import load_towers, read_catalog
    from clicktower.launcher.index import rank_slice
    from clicktower.launcher.retrieval import embed_texts

    if not 1 <= ranks[0] <= ranks[1]:
        raise DataError(f"--ranks {ranks[0]} {ranks[1]}: need 1 <= START <= END")
    if negatives < 1:
        raise DataError(f"--negatives {negatives}: must be >= 1")
    if Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
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
    q_len = getattr(query_tower, "max_length", None) or 32
    i_len = getattr(item_tower, "max_length", None) or 64
    rank, world = state.process_index, state.num_processes
    mine_q, mine_p = rank_slice(len(queries), rank, world), rank_slice(len(pool_texts), rank, world)
    q_part = embed_texts(query_tower, tokenizer, queries[mine_q], q_len, batch_size)
    p_part = embed_texts(item_tower, tokenizer, pool_texts[mine_p], i_len, batch_size)
    query_emb, pool_emb = _gather_rows(state, q_part), _gather_rows(state, p_part)
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
    (Path(out) / "mining.json").write_text(json.dumps(summary, indent=2) + "\n")
    state.wait_for_everyone()
    return summary


def _gather_rows(state: Any, part: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (uneven slices padded for the gather)."""
    if state.num_processes == 1:
        return part
    import torch.distributed as dist

    count = torch.tensor([part.shape[0]], device=state.device)
    counts = [torch.zeros_like(count) for _ in range(state.num_processes)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros(longest, part.shape[1], device=state.device)
    padded[:part.shape[0]] = part.to(state.device)
    chunks = [torch.zeros_like(padded) for _ in range(state.num_processes)]
    dist.all_gather(chunks, padded)
    return torch.cat([c[:int(n.item())] for c, n in zip(chunks, counts)]).cpu()


def _write(samples: list[dict], mined: list[list[dict]], manifest: dict, out: str,
           keep_existing: bool, shard_size: int | None, overwrite: bool) -> dict[str, Any]:
    """Write the samples with their negatives as JSONL, then shard it with ``write_shards``."""
    fields = set(manifest.get("fields") or ())
    tmp = Path(f"{out.rstrip(os.sep)}.mine-{os.getpid()}")
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


def main(argv: list[str] | None = None) -> int:
    """``clicktower mine``."""
    parser = argparse.ArgumentParser(prog="clicktower mine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="final/ folder or pretrained encoder folder")
    parser.add_argument("--manifest", required=True, help="input shard manifest (or its folder)")
    parser.add_argument("--out", required=True, help="output shard folder")
    parser.add_argument("--catalog", help="extra candidate items (item_id, item_text)")
    parser.add_argument("--ranks", type=int, nargs=2, default=(10, 100), metavar=("START", "END"),
                        help="1-based inclusive rank window of candidates (default 10 100)")
    parser.add_argument("--margin", type=float, default=0.05,
                        help="drop candidates scoring above the positive's score minus this")
    parser.add_argument("--negatives", type=int, default=5, help="hard negatives per sample")
    parser.add_argument("--keep-existing", action="store_true", help="keep the samples' own hard negatives first")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--shard-size", type=int, help="samples per output shard (default: the input's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output shard folder")
    args = parser.parse_args(argv)
    summary = mine(args.model, args.manifest, args.out, args.catalog, tuple(args.ranks), args.margin,
                   args.negatives, args.keep_existing, args.batch_size, args.shard_size, args.overwrite)
    if summary is not None:
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
