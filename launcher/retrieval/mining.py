"""Mine hard negatives with a trained model and write them into a new shard set
(``clicktower mine``).

For every sample of the manifest: retrieve its query's nearest items over the pool (the
manifest's own items, plus ``--catalog``), keep the candidates ranked inside ``--ranks START
END``, drop likely false negatives (the sample's own item or its text, the query's other
clicked items, candidates scoring above the positive's score less a margin or a relative
margin, ids in ``--exclude-ids-field``, variants of clicked items under ``--variant-key``) and
attach the first ``--negatives`` survivors, best first (or a seeded random choice with
``--sample random``), as the sample's ``hard_negatives``. The new set is written with the
project's shard writer. Under ``accelerate launch`` every rank embeds its slice of the pool and
of the queries; the main process ranks, filters and writes. Every option and why:
docs/retrieval.md ("Hard-negative mining").
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from clicktower.data.errors import DataError
from clicktower.data.features import FeatureTable
from clicktower.data.shards import load_manifest
from clicktower.data.storage import Storage, join
from clicktower.launcher.progress import status
from clicktower.launcher.retrieval.embedding import EMBED_BATCH_SIZE, embed_sharded
from clicktower.launcher.retrieval.metrics import exact_topk
from clicktower.launcher.retrieval.readers import load_towers, read_catalog_features, token_limits
from clicktower.launcher.retrieval.sample_writer import check_output_free, iter_manifest_samples, write_samples
from clicktower.modeling.cross_encoder import TEACHER_META
from clicktower.modeling.towers import resolve_model_path

SAMPLES = ("top", "random")
# With --teacher, this many times --negatives candidates are mined, so that the ones the
# teacher drops leave room for the next ones.
TEACHER_OVERSAMPLE = 2
# What becomes of the input's own hard negatives and teacher scores (``--existing``).
EXISTING = {"keep": "samples that have hard negatives keep them and their teacher scores; the others get mined ones",
            "merge": "their hard negatives first, then the mined ones; teacher scores dropped (they score only the "
                     "old negatives)",
            "replace": "mined negatives only; their hard negatives and teacher scores dropped"}
_log = logging.getLogger("clicktower")


def mine_negatives(query_emb: torch.Tensor, pool_emb: torch.Tensor, pool_ids: Sequence[str],
                   pool_texts: Sequence[str], samples: Sequence[dict], query_row: Sequence[int],
                   positive_row: Sequence[int], query_positives: Sequence[set[str]],
                   ranks: tuple[int, int] = (10, 100), margin: float | None = 0.05,
                   negatives: int = 5, *, relative_margin: float | None = None, sample: str = "top",
                   seed: int = 0, exclude: Sequence[set[str]] | None = None,
                   variant_key: str | None = None) -> list[list[dict]]:
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
        margin: drop candidates scoring above the positive's score minus this (None: off).
        negatives: at most this many negatives per sample.
        relative_margin: m: also drop candidates scoring above ``(1 - m) x`` the positive's
            score (NV-Retriever's TopK-PercPos; None: off).
        sample: ``"top"``: the best survivors; ``"random"``: a seeded uniform choice among
            every survivor of the window (listed best first).
        seed: the random choice's seed (the same negatives on any number of processes).
        exclude: per sample, item ids never to use as its negatives.
        variant_key: a regular expression; two items whose texts agree once every match is
            removed (case and spacing ignored) are variants of each other, and a variant of
            any item clicked for the sample's query is not a negative.

    Returns:
        One list of ``{"item_id", "item_text", "score"}`` per sample.
    """
    start, end = ranks
    k = min(end, pool_emb.shape[0])
    scores, rows = exact_topk(query_emb, pool_emb, k)
    positive_scores = (query_emb[list(query_row)] * pool_emb[list(positive_row)]).sum(-1).tolist()
    variants = _Variants(variant_key, pool_texts, samples, query_row)
    rng = np.random.default_rng(seed) if sample == "random" else None
    out = []
    for index, (item, q, pos_score) in enumerate(zip(samples, query_row, positive_scores)):
        ceiling = _ceiling(pos_score, margin, relative_margin)
        blocked = set(query_positives[q]) | (exclude[index] if exclude is not None else set())
        blocked.add(str(item["item_id"]))
        own_text, mined = _norm(item["item_text"]), []
        for score, row in zip(scores[q, start - 1:k].tolist(), rows[q, start - 1:k].tolist()):
            if score > ceiling:
                continue  # too close to (or above) the positive: likely an unlabelled positive
            if pool_ids[row] in blocked or _norm(pool_texts[row]) == own_text or variants.of_query(q, row):
                continue
            mined.append({"item_id": pool_ids[row], "item_text": pool_texts[row], "score": round(score, 6)})
            if rng is None and len(mined) == negatives:
                break
        if rng is not None and len(mined) > negatives:
            # A uniform choice inside the window, kept in rank order (best first).
            mined = [mined[i] for i in sorted(rng.choice(len(mined), negatives, replace=False).tolist())]
        out.append(mined)
    return out


def _ceiling(positive: float, margin: float | None, relative_margin: float | None) -> float:
    """The highest score a candidate may have: the lowest of the enabled margins' bounds."""
    bound = float("inf")
    if margin is not None:
        bound = positive - margin
    if relative_margin is not None:
        bound = min(bound, (1.0 - relative_margin) * positive)
    return bound


class _Variants:
    """Variant keys (``--variant-key``): an item text with every match of the pattern removed,
    lower-cased, spaces collapsed; per query row, the keys of the items clicked for it."""

    def __init__(self, pattern: str | None, pool_texts: Sequence[str], samples: Sequence[dict],
                 query_row: Sequence[int]) -> None:
        self.regex = re.compile(pattern, re.IGNORECASE) if pattern else None
        self.pool_texts, self.keys, self.by_query = pool_texts, {}, {}
        if self.regex is not None:
            for item, q in zip(samples, query_row):
                self.by_query.setdefault(q, set()).add(self.key(item["item_text"]))

    def key(self, text: str) -> str:
        """The text's variant key."""
        return _norm(self.regex.sub(" ", str(text)))

    def of_query(self, q: int, row: int) -> bool:
        """Pool row ``row`` is a variant of an item clicked for query row ``q``."""
        if self.regex is None:
            return False
        if row not in self.keys:
            self.keys[row] = self.key(self.pool_texts[row])
        return self.keys[row] in self.by_query.get(q, ())


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def mine(model: str, manifest_path: str, out: str, catalog: str | None = None,
         ranks: tuple[int, int] = (10, 100), margin: float = 0.05, negatives: int = 5,
         existing: str | None = None, batch_size: int = EMBED_BATCH_SIZE, shard_size: int | None = None,
         overwrite: bool = False, *, relative_margin: float | None = None, sample: str = "top", seed: int = 0,
         exclude_ids_field: str | None = None, variant_key: str | None = None,
         features_field: str = "features", teacher: str | None = None,
         teacher_margin: float = 0.0) -> dict[str, Any] | None:
    """Mine hard negatives for every sample of a manifest and write a new shard set.

    Args:
        model: ``final/`` folder or pretrained encoder folder.
        manifest_path: the input ``manifest.json`` or its folder (path or URL).
        out: the output shard folder or URL (must not exist unless ``overwrite``).
        catalog: optional extra candidate items (``item_id``, ``item_text``; path or URL).
        ranks: 1-based inclusive rank window of kept candidates.
        margin: drop candidates scoring above the positive's score minus this.
        negatives: hard negatives per sample.
        existing: ``keep``, ``merge`` or ``replace`` samples' own negatives (``EXISTING``); None: refuse.
        batch_size: texts per forward pass.
        shard_size: samples per output shard (default: the input's).
        overwrite: replace an existing output shard folder.
        relative_margin: also drop candidates scoring above ``(1 - m) x`` the positive's score.
        sample: ``"top"`` survivors or a seeded ``"random"`` choice among the window's survivors.
        seed: seed of the random choice.
        exclude_ids_field: a sample field listing item ids never used as that sample's
            negatives (e.g. ``exclude_ids``, from ``clicktower shard --exclude-ids-field``).
        variant_key: regular expression; items whose texts agree without its matches are
            variants, and variants of a query's clicked items are not its negatives.
        features_field: the catalog's feature vector field, read when the item tower fuses
            vectors; the pool's items (samples' own vectors too) are embedded with theirs,
            and each mined negative carries its vector into the new shards.
        teacher: a ``clicktower teacher train`` folder: ``TEACHER_OVERSAMPLE`` x ``negatives``
            candidates are mined, those it scores above its score of the positive less
            ``teacher_margin`` are dropped (RocketQA's denoising), the first ``negatives`` kept.
        teacher_margin: that margin, in teacher logits.

    Returns:
        A summary on the main process (``mining_seconds``: wall time from loading the model
        to the written shards), None on the others.
    """
    from accelerate import Accelerator

    started = time.perf_counter()
    _check_rules(ranks, negatives, relative_margin, sample, variant_key, teacher)
    check_output_free(out, overwrite)
    manifest = load_manifest(manifest_path)
    samples = list(iter_manifest_samples(manifest))
    had = _check_existing(samples, existing, manifest_path)  # before the model loads: fails fast
    query_tower, item_tower, tokenizer = load_towers(model)
    pool_ids, pool_texts, pool_features, vectors = _pool(samples, catalog, features_field, item_tower.features_dim)
    query_of: dict[str, int] = {}
    for s in samples:
        query_of.setdefault(s["query"], len(query_of))
    queries = list(query_of)

    state = Accelerator()  # honours ACCELERATE_USE_CPU (gloo) like clicktower embed
    query_tower, item_tower = query_tower.to(state.device), item_tower.to(state.device)
    q_len, i_len = token_limits(query_tower, item_tower)
    world = state.num_processes
    query_emb = embed_sharded(query_tower, tokenizer, queries, q_len, state.device, batch_size, progress="mine: queries")
    pool_emb = embed_sharded(item_tower, tokenizer, pool_texts, i_len, state.device, batch_size, pool_features, "mine: items")
    if not state.is_main_process and teacher is None:  # with a teacher, every rank scores a slice
        state.wait_for_everyone()
        return None

    pool_row = {item_id: i for i, item_id in enumerate(pool_ids)}
    query_row = [query_of[s["query"]] for s in samples]
    positives: list[set[str]] = [set() for _ in queries]
    for s, q in zip(samples, query_row):
        positives[q].add(str(s["item_id"]))
    exclude = None if exclude_ids_field is None else [{str(i) for i in s.get(exclude_ids_field) or ()}
                                                      for s in samples]
    mined = mine_negatives(query_emb, pool_emb, pool_ids, pool_texts, samples, query_row,
                           [pool_row[str(s["item_id"])] for s in samples], positives, ranks, margin,
                           negatives * (TEACHER_OVERSAMPLE if teacher else 1), relative_margin=relative_margin,
                           sample=sample, seed=seed, exclude=exclude, variant_key=variant_key)
    denoised = {}
    if teacher is not None:
        mined, denoised = _denoise(teacher, teacher_margin, samples, mined, negatives, state.device)
        if not state.is_main_process:
            state.wait_for_everyone()
            return None
    for negative in (n for negs in mined for n in negs):  # hard negatives carry their own vectors
        if negative["item_id"] in vectors:
            negative["features"] = vectors[negative["item_id"]]
    summary = {**_write(samples, mined, manifest, out, existing, shard_size, overwrite), "existing": existing, **had}
    summary.update({"model": str(model), "manifest": str(manifest_path), "pool_items": len(pool_ids),
                    "queries": len(queries), "ranks": list(ranks), "margin": margin,
                    "relative_margin": relative_margin, "sample": sample, "seed": seed,
                    "exclude_ids_field": exclude_ids_field, "variant_key": variant_key,
                    "negatives_per_sample": negatives, "num_processes": world, **denoised,
                    "mining_seconds": round(time.perf_counter() - started, 3)})  # part of training time
    _log.info("mined %d samples in %.1f s", len(samples), summary["mining_seconds"])
    Storage().write_bytes(join(out, "mining.json"), (json.dumps(summary, indent=2) + "\n").encode())
    state.wait_for_everyone()
    return summary


def _pool(samples: list[dict], catalog: str | None, features_field: str,
          dim: int | None) -> tuple[list[str], list[str], FeatureTable | None, dict[str, Any]]:
    """The candidate pool: ``(ids, texts, feature table, id -> vector)`` of the catalog's items
    and of every sample's positive (its score is needed); first text wins."""
    pool: dict[str, str] = {}
    vectors: dict[str, Any] = {}  # item id -> feature vector, for an item tower that fuses them
    if catalog is not None:
        ids, texts, table = read_catalog_features(catalog, features_field if dim else None, dim)
        for row, (item_id, text) in enumerate(zip(ids, texts)):
            pool.setdefault(item_id, text)
            if table is not None and table.present[row]:
                vectors.setdefault(item_id, table.values[row])
    for s in samples:
        pool.setdefault(str(s["item_id"]), s["item_text"])
        if dim and s.get("features") is not None and len(s["features"]) == dim:
            vectors.setdefault(str(s["item_id"]), s["features"])
    pool_ids = list(pool)
    pool_features = FeatureTable.from_rows([vectors.get(i) for i in pool_ids], dim) if dim else None
    return pool_ids, list(pool.values()), pool_features, vectors


def _denoise(teacher: str, margin: float, samples: list[dict], mined: list[list[dict]], keep: int,
             device: Any) -> tuple[list[list[dict]], dict[str, Any]]:
    """Drop the mined negatives the teacher scores within ``margin`` of the positive (every
    rank scores its slice of the pairs), then keep each sample's first ``keep``."""
    from clicktower.launcher.retrieval.teacher_score import (drop_close_negatives, load_teacher,
                                                              sample_pairs, score_sharded, split_scores)

    started = time.perf_counter()
    model, tokenizer, meta = load_teacher(teacher)
    pairs = sample_pairs(samples, mined)
    scores = score_sharded(model.to(device), tokenizer, pairs, meta["max_length"], device, progress="mine: teacher")
    kept, dropped = drop_close_negatives(mined, split_scores(scores, mined), margin)
    # The teacher's share of mining_seconds, so that a time budget can count it apart.
    return [k[:keep] for k in kept], {"teacher": teacher, "teacher_margin": margin,
                                      "teacher_candidates": len(pairs) - len(samples), "teacher_dropped": dropped,
                                      "teacher_seconds": round(time.perf_counter() - started, 3)}


def _check_rules(ranks: tuple[int, int], negatives: int, relative_margin: float | None, sample: str,
                 variant_key: str | None, teacher: str | None = None) -> None:
    """The mining settings a user can get wrong, as errors naming the flag (before any model loads)."""
    if teacher is not None and not (Path(resolve_model_path(teacher)) / TEACHER_META).is_file():
        raise FileNotFoundError(f"--teacher {teacher}: not a teacher folder (no {TEACHER_META}; "
                                f"write one with clicktower teacher train)")
    if not 1 <= ranks[0] <= ranks[1]:
        raise DataError(f"--ranks {ranks[0]} {ranks[1]}: need 1 <= START <= END")
    if negatives < 1:
        raise DataError(f"--negatives {negatives}: must be >= 1")
    if relative_margin is not None and not 0 <= relative_margin < 1:
        raise DataError(f"--relative-margin {relative_margin}: must lie in [0, 1)")
    if sample not in SAMPLES:
        raise DataError(f"--sample {sample!r}: must be one of {', '.join(SAMPLES)}")
    if variant_key is not None:
        try:
            re.compile(variant_key)
        except re.error as exc:
            raise DataError(f"--variant-key {variant_key!r}: not a regular expression ({exc})") from None


def _check_existing(samples: list[dict], existing: str | None, manifest_path: str) -> dict[str, int]:
    """Count the samples with their own hard negatives or teacher scores; refuse them without
    an ``existing`` policy (nothing is dropped silently), else say on stderr what happens."""
    if existing is not None and existing not in EXISTING:
        raise DataError(f"--existing {existing!r}: must be one of {', '.join(EXISTING)}")
    had = {"samples_with_hard_negatives": sum(bool(s.get("hard_negatives")) for s in samples),
           "samples_with_teacher_scores": sum(s.get("teacher_scores") is not None for s in samples)}
    if not any(had.values()):
        return had
    found = (f"{had['samples_with_hard_negatives']} of {len(samples)} samples have hard negatives and "
             f"{had['samples_with_teacher_scores']} teacher scores")
    if existing is None:
        choices = "; ".join(f"{name}: {what}" for name, what in EXISTING.items())
        raise DataError(f"{found} already; choose what becomes of them with --existing ({choices})",
                        source=manifest_path)
    _log.warning("mine --existing %s: %s: %s", existing, found, EXISTING[existing])
    return had


def _negatives(sample: dict, mined: list[dict], existing: str | None) -> tuple[list[dict], Any]:
    """A sample's hard negatives and teacher scores in the new shards (``--existing``)."""
    own = list(sample.get("hard_negatives") or [])
    if existing == "keep" and own:
        return own, sample.get("teacher_scores")
    return (own + mined if existing == "merge" else mined), None


def _write(samples: list[dict], mined: list[list[dict]], manifest: dict, out: str,
           existing: str | None, shard_size: int | None, overwrite: bool) -> dict[str, Any]:
    """Write the samples with their mined negatives (``--existing`` applied) as new shards."""
    status(f"mine: writing {len(samples)} samples with their mined negatives to {out}")
    chosen = [_negatives(s, [{k: n[k] for k in ("item_id", "item_text", "features") if k in n} for n in negs],
                         existing) for s, negs in zip(samples, mined)]
    summary = write_samples(samples, [c[0] for c in chosen], [c[1] for c in chosen], manifest, out,
                            shard_size, overwrite, "mine")
    summary["mean_mined_per_sample"] = round(sum(map(len, mined)) / max(1, len(mined)), 3)
    return summary
