"""Score (query, item) pairs with a trained teacher, on one rank or split over ranks
(``clicktower teacher score``, ``clicktower mine --teacher``).

``teacher score`` writes the input samples again, each with ``teacher_scores``: the teacher's
logit of its positive, then of each of its hard negatives, the list ``loss.distill_weight``
reads. Under ``accelerate launch`` every rank scores its ``rank_slice`` of the pairs and the
slices are gathered (as ``embed_sharded`` does for embeddings); the main process writes with
``mining.write_samples``. ``drop_close_negatives`` is RocketQA's denoising rule for ``mine``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from clicktower.data.errors import DataError
from clicktower.data.shards import load_manifest
from clicktower.data.storage import Storage, join
from clicktower.kernels import distributed_world, gather_with_grad
from clicktower.launcher.progress import bar, status
from clicktower.launcher.retrieval.embedding import rank_slice
from clicktower.launcher.retrieval.sample_writer import check_output_free, iter_manifest_samples, write_samples
from clicktower.modeling.cross_encoder import CrossEncoder
from clicktower.modeling.towers import download_model

SCORE_BATCH_SIZE = 64


def load_teacher(path: str) -> tuple[CrossEncoder, Any, dict]:
    """``(model, tokenizer, meta)`` of a ``clicktower teacher train`` folder, in eval mode.

    Args:
        path: the teacher folder (or a ``pkg://`` reference / Hub id of one).
    """
    from transformers import AutoTokenizer

    folder = download_model(path)
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{path}: no such teacher folder")
    model, meta = CrossEncoder.from_pretrained(folder)
    return model.eval(), AutoTokenizer.from_pretrained(folder), meta


@torch.no_grad()
def score_pairs(model: CrossEncoder, tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int,
                batch_size: int = SCORE_BATCH_SIZE, progress: str | None = None) -> torch.Tensor:
    """[len(pairs)] float32 teacher logits on the CPU, in batches sorted by length.

    Args:
        model: the teacher.
        tokenizer: its tokenizer.
        pairs: ``(query, item text)`` pairs.
        max_length: token limit of a pair.
        batch_size: pairs per forward pass.
        progress: label of a progress bar on stderr (None: no bar).
    """
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out = torch.empty(len(pairs))
    shown = bar(len(pairs), progress or "", enabled=progress is not None, unit="pair")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([pairs[i][0] for i in idx], [pairs[i][1] for i in idx], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        out[idx] = model(**{k: v.to(device) for k, v in enc.items()}).float().cpu()
        shown.update(len(idx))
    shown.close()
    return out


def score_sharded(model: CrossEncoder, tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int,
                  device: torch.device, batch_size: int = SCORE_BATCH_SIZE,
                  progress: str | None = None) -> torch.Tensor:
    """Every pair's score on every rank: each rank scores its ``rank_slice``, then all-gather.

    Args:
        model: the teacher (the same weights on every rank).
        tokenizer: its tokenizer.
        pairs: every pair (every rank passes the same).
        max_length: token limit of a pair.
        device: the collective's device.
        batch_size: pairs per forward pass.
        progress: label of rank 0's progress bar.
    """
    rank, world = distributed_world()
    label = None if progress is None or rank else progress + (f" (rank 0 of {world})" if world > 1 else "")
    local = score_pairs(model, tokenizer, list(pairs[rank_slice(len(pairs), rank, world)]), max_length,
                        batch_size, label)
    if world == 1:
        return local
    return gather_with_grad(local[:, None].to(device)).squeeze(1).cpu()


def sample_pairs(samples: Sequence[dict], negatives: Sequence[Sequence[dict]]) -> list[tuple[str, str]]:
    """The pairs to score, sample by sample: its positive, then each of ``negatives``.

    Args:
        samples: the samples (``query``, ``item_text``).
        negatives: per sample, its negatives (``item_text``).
    """
    return [pair for s, negs in zip(samples, negatives)
            for pair in [(s["query"], s["item_text"])] + [(s["query"], n["item_text"]) for n in negs]]


def split_scores(scores: torch.Tensor, negatives: Sequence[Sequence[dict]]) -> list[list[float]]:
    """``score_sharded``'s flat scores of ``sample_pairs`` back into one list per sample.

    Args:
        scores: the flat scores.
        negatives: per sample, its negatives (how many scores each sample has after its positive's).
    """
    out, at = [], 0
    for negs in negatives:
        out.append([round(float(v), 6) for v in scores[at:at + 1 + len(negs)]])
        at += 1 + len(negs)
    return out


def drop_close_negatives(negatives: Sequence[list[dict]], scores: Sequence[list[float]],
                         margin: float) -> tuple[list[list[dict]], int]:
    """RocketQA's denoised hard negatives: drop each negative the teacher scores within
    ``margin`` of its sample's positive (``teacher(q, neg) > teacher(q, pos) - margin``).

    Args:
        negatives: per sample, its mined negatives.
        scores: per sample, the teacher's score of its positive, then of each negative.
        margin: how far below the positive a negative must score to stay.

    Returns:
        ``(kept negatives per sample, number dropped)``.
    """
    kept, dropped = [], 0
    for negs, (positive, *theirs) in zip(negatives, scores):
        survivors = [n for n, s in zip(negs, theirs) if not s > positive - margin]
        dropped += len(negs) - len(survivors)
        kept.append(survivors)
    return kept, dropped


def rerank_metrics(teacher: str, queries_path: str, catalog_path: str, min_relevance: float,
                   batch_size: int = SCORE_BATCH_SIZE) -> dict[str, Any]:
    """The teacher as a reranker (``clicktower teacher eval``): each query's judged items ranked
    by its scores; Recall@k, MRR@10, nDCG@10 as ``clicktower eval --mode rerank`` reports them.

    Args:
        teacher: the teacher folder.
        queries_path: judged queries (JSONL ``{"query", "relevance": {item_id: grade}}``).
        catalog_path: the items (``item_id``, ``item_text``).
        min_relevance: the grade from which an item is relevant.
        batch_size: pairs per forward pass.
    """
    from clicktower.launcher.retrieval.metrics import mean_metrics, query_metrics
    from clicktower.launcher.retrieval.readers import read_catalog, read_judged_queries

    judged = read_judged_queries(queries_path)
    text = dict(zip(*read_catalog(catalog_path)))
    model, tokenizer, meta = load_teacher(teacher)
    candidates = [[i for i in grades if i in text] for _, grades in judged]
    pairs = [(query, text[i]) for (query, _), items in zip(judged, candidates) for i in items]
    scores, at, per_query = score_pairs(model, tokenizer, pairs, meta["max_length"], batch_size, "teacher eval"), 0, []
    for (_, grades), items in zip(judged, candidates):
        order = scores[at:at + len(items)].argsort(descending=True).tolist()
        at += len(items)
        per_query.append(query_metrics([items[j] for j in order], grades, min_relevance))
    return {"mode": "rerank", "teacher": str(teacher), **mean_metrics(per_query)}


def score_shards(teacher: str, manifest_path: str, out: str, batch_size: int = SCORE_BATCH_SIZE,
                 shard_size: int | None = None, overwrite: bool = False) -> dict | None:
    """``clicktower teacher score``: the samples again, with the teacher's scores.

    Args:
        teacher: the teacher folder.
        manifest_path: input shard manifest (or its folder).
        out: output shard folder.
        batch_size: pairs per forward pass.
        shard_size: samples per output shard (None: the input's).
        overwrite: replace an existing output.

    Returns:
        The summary on the main process, None on the others.
    """
    from accelerate import Accelerator

    started = time.perf_counter()
    check_output_free(out, overwrite)
    manifest = load_manifest(manifest_path)
    samples = list(iter_manifest_samples(manifest))
    if not samples:
        raise DataError(f"{manifest_path}: no samples")
    model, tokenizer, meta = load_teacher(teacher)
    state = Accelerator()  # honours ACCELERATE_USE_CPU (gloo) like clicktower embed and mine
    model = model.to(state.device)
    negatives = [list(s.get("hard_negatives") or ()) for s in samples]
    pairs = sample_pairs(samples, negatives)
    scores = score_sharded(model, tokenizer, pairs, meta["max_length"], state.device, batch_size,
                           "teacher score")
    if not state.is_main_process:
        state.wait_for_everyone()
        return None
    status(f"teacher score: writing {len(samples)} samples with {len(pairs)} teacher scores to {out}")
    summary = write_samples(samples, negatives, split_scores(scores, negatives), manifest, out, shard_size,
                            overwrite, "teacher")
    summary.update({"teacher": str(teacher), "manifest": str(manifest_path), "pairs_scored": len(pairs),
                    "replaced_teacher_scores": sum(s.get("teacher_scores") is not None for s in samples),
                    "num_processes": state.num_processes,
                    "scoring_seconds": round(time.perf_counter() - started, 3)})
    Storage().write_bytes(join(out, "teacher_scoring.json"), (json.dumps(summary, indent=2) + "\n").encode())
    state.wait_for_everyone()
    return summary
