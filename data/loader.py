"""Streaming click-pair batches from indexed WebDataset shards to every rank and loader worker.

``ClickPairLoader`` yields ``PairBatch``es (``data/batch.py``). An epoch's order is a function
of the manifest counts, the seed and the config alone (``clicktower.data.order``): shard
blocks dealt round-robin to the ranks, read in windows that mix ``interleave_shards`` shards
per global batch, the same batches for any worker count. Every rank yields the same number
of batches; a bad sample is skipped and counted (or raised, ``on_error="raise"``) without
moving any other sample. The state (epoch, samples consumed, per-layout segments) resumes
exactly on any world or batch size, each sample read at most once per epoch; ``data.mix``
mixes several manifests in a fixed, seeded pattern (always infinite).

Order, resume, bad data and mixing in detail: docs/data.md.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from clicktower.data.batch import PairBatch, PairLabels
from clicktower.data.errors import DataError
from clicktower.data.features import FeatureTable
from clicktower.data.manifest import ShardTable, apply_file_check, check_shard_files, load_manifest
from clicktower.data.order import MIX_PERIOD
from clicktower.data.outputs import merged_popularity
from clicktower.data.storage import DEFAULT_MAX_RETRIES, Storage
from clicktower.data.stream import ERROR_REASONS, Plan, RankStream, Source, intact_samples

log = logging.getLogger("clicktower.data")

ON_ERROR = ("skip", "raise")
__all__ = ["ClickPairLoader", "DataConfig", "ERROR_REASONS", "MIX_PERIOD", "MixEntry", "PairBatch",
           "PairLabels", "PairTokenizer", "Rank", "batches_until_epoch", "stable_id"]


@dataclass
class MixEntry:
    """One manifest of a weighted mix (``data.mix``).

    Args:
        manifest: ``manifest.json`` (or its folder) written by ``clicktower shard``.
        weight: its share of the stream, relative to the other entries' weights.
    """

    manifest: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.manifest, str) or not self.manifest.strip():
            raise ValueError(f"data.mix: manifest must be a path, got {self.manifest!r}")
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"data.mix: weight of {self.manifest} must be a finite number >= 0, "
                             f"got {self.weight}")


@dataclass
class DataConfig:
    """Data section of the experiment config.

    Args:
        train_manifest: ``manifest.json`` (or its folder) written by ``clicktower shard``.
        mix: instead of ``train_manifest``, several manifests mixed by weight, e.g.
            ``[{manifest: clicks, weight: 0.7}, {manifest: purchases, weight: 0.3}]``: a
            fixed seeded pattern per 1000 positions, each manifest read in its own epoch
            orders. A mix is an endless stream (as ``infinite``).
        num_workers: loader worker processes per rank (0 reads in the training process).
        shuffle_buffer: size of the shuffle window (positions permuted together).
        on_error: ``"skip"`` bad samples (counted and logged) or ``"raise"`` a DataError.
        max_text_chars: a query or item text longer than this is a bad sample.
        block_size: samples per block: the unit a rank is given and reads with one request
            (1024 pairs of ~1 KiB make ~1 MiB requests).
        infinite: chain epochs without end instead of stopping at each epoch.
        hard_negatives_per_query: hard negatives of each sample (its ``hard_negatives`` field)
            added to the batch as extra negatives for every query (0: none).
        pad_to_multiple_of: token tensors are padded to the batch's longest text rounded up
            to this (8 suits GPU tensor cores; 1 pads no further, which is cheaper on CPUs).
        interleave_shards: blocks of this many shards are read in turn, so that a global
            batch mixes about this many shards (at least half of min(shards, this)).
        storage_options: fsspec options for URL manifests and shards (endpoints, profiles,
            anything the store's standard settings do not give; credentials are best left
            to those: ``AWS_ACCESS_KEY_ID``..., read by the store library itself).
        prefetch_blocks: runs of samples (about a block each) a worker fetches ahead of the
            window it decodes: bounds the memory of prefetching.
        io_threads: concurrent requests per worker.
        cache_dir: optional node-local folder keeping fetched shard bytes for later epochs
            (shared by the node's processes), at most ``cache_max_bytes``, least recently
            used evicted first, keyed by the content the manifest names (sha256, size,
            version tag); URLs only (local shards need no cache).
        cache_max_bytes: size limit of ``cache_dir``.
        max_retries: retries of a transient read failure (timeout, dropped connection, HTTP
            429/5xx), with exponential backoff; each is counted (``data_retries``), and a
            read still failing is a bad sample (``data.on_error``).
    """

    train_manifest: str | None = None
    mix: list[MixEntry] | None = None
    num_workers: int = 0
    shuffle_buffer: int = 1000
    on_error: str = "skip"
    max_text_chars: int = 20_000
    block_size: int = 1024
    infinite: bool = False
    hard_negatives_per_query: int = 0
    pad_to_multiple_of: int = 8
    interleave_shards: int = 16
    storage_options: dict[str, Any] | None = None
    prefetch_blocks: int = 16
    io_threads: int = 8
    cache_dir: str | None = None
    cache_max_bytes: int = 50 * 2**30
    max_retries: int = DEFAULT_MAX_RETRIES

    def manifests(self) -> list[str]:
        """The manifest paths to train on: ``train_manifest``, or those of ``mix``."""
        if self.mix is not None:
            return [m.manifest for m in self.mix]
        return [] if self.train_manifest is None else [self.train_manifest]

    def __post_init__(self) -> None:
        if self.mix is not None:
            # From Python (not YAML) entries may come as plain dicts.
            self.mix = [MixEntry(**m) if isinstance(m, dict) else m for m in self.mix]
            if not self.mix:
                raise ValueError("data.mix must list at least one {manifest, weight}")
            if self.train_manifest is not None:
                raise ValueError("set data.train_manifest or data.mix, not both")
            if sum(m.weight for m in self.mix) <= 0:
                raise ValueError("data.mix: the weights must not all be 0")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"data.on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.max_text_chars < 1:
            raise ValueError(f"data.max_text_chars must be >= 1, got {self.max_text_chars}")
        if self.block_size < 1:
            raise ValueError(f"data.block_size must be >= 1, got {self.block_size}")
        if self.hard_negatives_per_query < 0:
            raise ValueError(f"data.hard_negatives_per_query must be >= 0, got {self.hard_negatives_per_query}")
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"data.pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        for name in ("interleave_shards", "prefetch_blocks", "io_threads", "cache_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise ValueError(f"data.max_retries must be >= 0, got {self.max_retries}")
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise ValueError(f"data.storage_options must be a mapping, got {self.storage_options!r}")
        if self.cache_dir is not None and not str(self.cache_dir).strip():
            raise ValueError("data.cache_dir must be a folder path (or null for no cache)")


def stable_id(text: str) -> int:
    """A process-independent non-negative int64 id for a string (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def popularity_counts(manifests: list[str], storage_options: dict | None = None) -> dict:
    """The item and query counts ``clicktower shard`` recorded in ``manifests`` (summed), keyed
    by the ids the loader gives (``stable_id``): ``{"items": (ids, counts), "queries": (ids,
    counts)}`` int64 tensors, for the loss's logQ correction (``popularity_source: counts``).

    Args:
        manifests: manifest paths or URLs (``DataConfig.manifests()``).
        storage_options: fsspec options for URLs.

    Raises:
        DataError: a manifest written before counts were recorded.
    """
    parts = []
    for path in manifests:
        manifest = load_manifest(path, check_files=False, storage_options=storage_options)
        if "popularity" not in manifest:
            raise DataError(f"{manifest['path']} has no popularity counts (sharded before they were recorded): "
                            "re-shard it, or use loss.popularity_source: streaming")
        parts.append(manifest["popularity"])
    merged = merged_popularity(parts)
    return {kind: (torch.tensor([stable_id(key) for key in counts], dtype=torch.long),
                   torch.tensor(list(counts.values()), dtype=torch.long)) for kind, counts in merged.items()}


def _labels(samples: list[dict], negatives: list[dict] | None, per_query: int) -> PairLabels:
    """The batch's labels: item and query ids, ``weights`` and ``exclude_ids`` when a sample
    carries them and, when the batch has hard negatives (``negatives``, at most ``per_query``
    of each sample), their ids and owners and ``teacher_scores``."""
    labels = PairLabels(
        item_ids=torch.tensor([stable_id(str(s["item_id"])) for s in samples], dtype=torch.long),
        query_ids=torch.tensor([stable_id(s["query"]) for s in samples], dtype=torch.long))
    if any("weight" in s for s in samples):
        labels.weights = torch.tensor([float(s.get("weight", 1.0)) for s in samples])
    if any("exclude_ids" in s for s in samples):
        labels.exclude_ids = _exclusion_lists(samples)
    if negatives is not None:
        labels.hard_negative_ids = torch.tensor([stable_id(str(n["item_id"])) for n in negatives],
                                                dtype=torch.long)
        labels.hard_negative_owner, labels.teacher_scores = _negative_owners_and_teacher(samples, per_query)
    return labels


def _exclusion_lists(samples: list[dict]) -> torch.Tensor:
    """[B, E] int64 ``stable_id`` of each sample's ``exclude_ids``, padded with -1 (E: the
    longest list, at least 1)."""
    lists = [[stable_id(str(i)) for i in s.get("exclude_ids") or ()] for s in samples]
    out = torch.full((len(samples), max([1, *map(len, lists)])), -1, dtype=torch.long)
    for row, ids in enumerate(lists):
        out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def _negative_owners_and_teacher(samples: list[dict], per_query: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The owner [H] of each hard negative in the batch (its sample) and, when a sample
    carries them, the teacher scores [B, 1 + per_query]: its positive's and its kept hard
    negatives' scores, NaN where it has none (else None)."""
    counts = [len(s.get("hard_negatives", [])[:per_query]) for s in samples]
    owner = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(counts, dtype=torch.long))
    if not any("teacher_scores" in s for s in samples):
        return owner, None
    teacher = torch.full((len(samples), 1 + per_query), float("nan"))
    for row, (s, n) in enumerate(zip(samples, counts)):
        scores = s.get("teacher_scores")
        if scores:  # the positive's, then the first n negatives' (the ones kept)
            teacher[row, :1 + n] = torch.tensor([float(v) for v in scores[:1 + n]])
    return owner, teacher


def _collate(samples: list[dict], cfg: DataConfig, tokens: PairTokenizer | None,
             features_dim: int | None) -> PairBatch:
    """``ClickPairLoader.collate``: the item rows are the samples' items, then (with
    ``tokens``) up to ``cfg.hard_negatives_per_query`` hard negatives of each, in order."""
    per_query = cfg.hard_negatives_per_query
    negatives = None
    if per_query and tokens is not None:
        negatives = [n for s in samples for n in s.get("hard_negatives", [])[:per_query]]
    batch = PairBatch(keys=[s["__key__"] for s in samples], queries=[s["query"] for s in samples],
                      items=[s["item_text"] for s in samples], labels=_labels(samples, negatives, per_query))
    if any("hard_negatives" in s for s in samples):
        batch.hard_negatives = [s.get("hard_negatives", []) for s in samples]
    if features_dim is not None:
        # One row per item row of the model (the batch's items, then its hard negatives).
        table = FeatureTable.from_rows([e.get("features") for e in [*samples, *(negatives or ())]], features_dim)
        batch.item_features = torch.from_numpy(table.values)
        batch.item_features_present = torch.from_numpy(table.present)
        batch.counts["missing_features"] = table.num_missing
    elif samples and all("features" in s for s in samples):
        if len({np.shape(s["features"]) for s in samples}) == 1:  # as read; no model input
            batch.item_features = torch.from_numpy(np.stack([s["features"] for s in samples]))
    if tokens is not None:
        # Hard negatives tokenised WITH the items: one item-tower forward embeds both, so every
        # rank runs the same number of forward passes (ZeRO-3) whatever its negative count.
        items = batch.items + [n["item_text"] for n in negatives or ()]
        batch.tokens = tokens(batch.queries, items, cfg.pad_to_multiple_of)
    return batch


# --------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rank:
    """Which rank of how many a loader reads for (``accelerator.process_index`` of
    ``accelerator.num_processes``).

    Args:
        rank: this rank, ``0 <= rank < world_size``.
        world_size: number of ranks.
    """

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")


@dataclass(frozen=True)
class PairTokenizer:
    """The towers' tokenizer and its token limits (``model.max_query_length`` and
    ``model.max_item_length``); with it, batches carry padded token tensors.

    Args:
        tokenizer: a Hugging Face (fast) tokenizer.
        max_query_length: token limit for queries.
        max_item_length: token limit for items (hard negatives included).
    """

    tokenizer: Any
    max_query_length: int
    max_item_length: int

    def __call__(self, queries: list[str], items: list[str],
                 pad_to_multiple_of: int) -> dict[str, torch.Tensor]:
        """Tokenise both sides, padded to the longest in the batch (rounded up to a multiple).

        Args:
            queries: query texts.
            items: item texts.
            pad_to_multiple_of: round the padded length up to a multiple of this (1: no
                rounding; ``data.pad_to_multiple_of``).
        """
        out = {}
        for side, texts, limit in (("query", queries, self.max_query_length),
                                   ("item", items, self.max_item_length)):
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=limit,
                                 pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")
            out[f"{side}_input_ids"] = enc["input_ids"]
            out[f"{side}_attention_mask"] = enc["attention_mask"]
        return out


def _load_manifests(manifest: str | dict | Sequence[str | dict], cfg: DataConfig, storage: Storage,
                    rank: int, broadcast_object: Callable[[Any], Any] | None) -> list[tuple[dict, bool]]:
    """The loaded manifest(s) the loader reads, their files checked: one, or one per
    ``cfg.mix`` entry, each with whether this call checked it (its findings not yet reported).

    Every rank reads the manifest itself (one request); the shard and index files are
    checked by one rank when ``broadcast_object`` is given (rank 0 checks, every rank gets
    its findings), else by every rank. A manifest dict already checked under this policy
    (or ``"raise"``), such as another loader's ``manifests``, is used as it is.

    Args:
        manifest: path or URL of ``manifest.json`` (or its folder), a loaded manifest, or
            (with ``cfg.mix``) a list of those in ``cfg.mix`` order.
        cfg: the data config (its ``mix`` and ``on_error``).
        storage: where to read from.
        rank: this rank (rank 0 checks the files).
        broadcast_object: called on every rank with rank 0's object, returns rank 0's object.
    """
    manifests = list(manifest) if isinstance(manifest, (list, tuple)) else [manifest]
    if len(manifests) != (1 if cfg.mix is None else len(cfg.mix)):
        raise ValueError(f"{len(manifests)} manifests given: mixing manifests needs data.mix "
                         f"with one mix weight each, in the same order")
    on_missing = "raise" if cfg.on_error == "raise" else "skip"
    loaded = []
    for i, m in enumerate(manifests):
        if isinstance(m, dict) and isinstance(m.get("shards"), ShardTable):
            # Checked already under this policy or "raise": used as is (checking again
            # would look at every shard a second time). Unchecked (check_files=False), or
            # checked under "skip" for a "raise" loader: checked (again) below.
            done = m.get("on_missing") in (on_missing, "raise")
            if not done:
                m["shards"].missing.clear()
                m["shards"].damaged.clear()
            loaded.append((m, not done))
            continue
        if isinstance(m, dict):
            if "path" not in m:
                raise ValueError("a manifest dict must come from load_manifest")
            m = m["path"]
        try:
            loaded.append((load_manifest(m, check_files=False, storage=storage), True))
        except DataError as exc:   # name the key that gave the path: the fix goes there
            key = "data.train_manifest" if cfg.mix is None else f"data.mix[{i}].manifest"
            raise DataError(f"{key}: {exc}") from None
    found = None
    if broadcast_object is None or rank == 0:
        found = [_check_files(m, storage) if todo else None for m, todo in loaded]
    if broadcast_object is not None:
        found = broadcast_object(found)
    for (m, _), f in zip(loaded, found):
        if f is None:
            continue
        if "error" in f:   # rank 0 could not check: every rank stops with its message
            raise DataError(f["error"], source=m["path"])
        apply_file_check(m["shards"], f, on_missing, m["path"])
        m["shards"].intact = f["intact"]
        m["on_missing"] = on_missing
    return loaded


def _check_files(manifest: dict, storage: Storage) -> dict:
    """``check_shard_files``' findings plus the intact samples of each damaged shard, or
    ``{"error": ...}`` (so that rank 0 always has something to broadcast)."""
    table = manifest["shards"]
    try:
        found = check_shard_files(table, storage)
        found["intact"] = {i: intact_samples(table, i, storage) for i in found["damaged"]}
        return found
    except DataError as exc:
        return {"error": exc.message}
    except Exception as exc:   # noqa: BLE001 - the store's errors, after the retries
        return {"error": f"cannot check the shards ({type(exc).__name__}: {exc})"}


def batches_until_epoch(loader: "ClickPairLoader", epochs: int) -> int:
    """Batches every rank of ``loader`` still yields before the data has been read ``epochs``
    times: the rest of the current epoch, then ``len(loader)`` for each epoch before
    ``epochs`` (a finite stream, read under the loader's world and batch size); an endless
    stream of one manifest counts global positions, up to ``epochs x num_samples``. What a
    run of ``train.epochs`` passes has left, from any restored position on any world size.

    Args:
        loader: the loader, at its (restored) position.
        epochs: passes over the data in all (``train.epochs``).

    Raises:
        ValueError: a mix of manifests (an endless stream without epochs).
    """
    if loader.cfg.mix is not None:
        raise ValueError("a mix of manifests has no epochs to count")
    if loader.infinite:   # one global position across the passes, no remainder dropped
        return max(0, epochs * loader.num_samples - loader.samples_consumed) // loader.global_batch
    if loader.epoch >= epochs:
        return 0
    return loader.remaining_batches() + (epochs - 1 - loader.epoch) * len(loader)


def _warn_damage(sources: list[Source]) -> None:
    """Log the missing and damaged shards found at start (the first 3 of each, then totals)."""
    for src in sources:
        for why in list(src.missing.values())[:3]:
            log.warning("data.on_error=skip: %s: its samples leave the order", why)
        for why in list(src.damaged.values())[:3]:
            log.warning("data.on_error=skip: %s: reading the samples that are there", why)
        if len(src.missing) + len(src.damaged) > 6:
            log.warning("data.on_error=skip: %d shards missing, %d damaged in all",
                        len(src.missing), len(src.damaged))


class _NoFeaturesWarning:
    """One warning line when the model expects item feature vectors (``features_dim``) and
    the first batches read carry none: the item tower would train on its learnt "missing"
    embedding alone, silently (shards written without ``--features-field``/``--features-file``,
    or another field name). Rank 0's loader only, and not a loader of another loader's checked
    manifests, so that a run warns once.

    Args:
        features_dim: the model's ``item_features_dim`` (None: nothing to watch).
    """

    BATCHES = 8  # watched batches: a few, since a batch of sparse vectors may hold none by chance

    def __init__(self, features_dim: int | None) -> None:
        self.features_dim, self.done = features_dim, features_dim is None
        self.batches = self.rows = 0

    def see(self, batch: PairBatch, missing: int) -> None:
        """Count a batch read: ``missing`` of its item rows lack a vector."""
        if self.done:
            return
        rows = 0 if batch.item_features_present is None else int(batch.item_features_present.numel())
        if rows > missing:  # a vector arrived: nothing to say
            self.done = True
            return
        self.batches, self.rows = self.batches + 1, self.rows + rows
        if self.batches >= self.BATCHES:
            self.finish()

    def finish(self) -> None:
        """Warn now if no batch seen had a vector (at most once)."""
        if self.done or not self.batches:
            return
        self.done = True
        log.warning("model.item_features_dim=%d, but the first %d batch(es) read (%d item rows) carry no item "
                    "feature vector: the item tower trains on its learnt 'missing' embedding alone (were the "
                    "shards written with --features-field or --features-file?)", self.features_dim,
                    self.batches, self.rows)


class ClickPairLoader:
    """Batches of (query, item) pairs for one rank, resumable to the exact sample on any
    world size and worker count (see the module docstring for the order and the rules).

    Everything about reading (workers, shuffle, bad data, mode, hard negatives, padding)
    comes from ``cfg``; mixing and ``cfg.infinite`` make the stream endless.

    Args:
        cfg: the data config (already validated by ``DataConfig``).
        manifest: path of ``manifest.json`` (or its folder) or a loaded manifest; with
            ``cfg.mix``, a list of those in ``cfg.mix`` order (the weights come from
            ``cfg.mix``). Another loader's ``manifests`` (same ``cfg``) are taken as
            checked: no shard is read or checked again, and their damage is not reported twice.
        batch_size: pairs per batch on this rank.
        rank: this rank and the world size.
        seed: seed of the epoch orders.
        tokens: the tokenizer and token limits; without it, batches carry texts only.
        broadcast_object: in a distributed run, a function the launcher gives that every
            rank calls with an object and that returns rank 0's object on every rank (e.g.
            over ``torch.distributed.broadcast_object_list``): then only rank 0 checks the
            shard files at start (``clicktower.data`` sets up no collectives itself).
        features_dim: the model's ``item_features_dim``: every batch then carries
            ``item_features`` [items + hard negatives, dim] and ``item_features_present``
            (rows without a vector are zeros, counted as ``missing_features``), and a vector
            of another length is a bad sample (``bad_features``). None: no model input.
    """

    def __init__(self, cfg: DataConfig, manifest: str | dict | Sequence[str | dict],
                 batch_size: int, rank: Rank = Rank(), seed: int = 0,
                 tokens: PairTokenizer | None = None,
                 broadcast_object: Callable[[Any], Any] | None = None,
                 features_dim: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.features_dim, self._missing_features = features_dim, 0
        storage = Storage(cfg.storage_options, cfg.max_retries)
        loaded = _load_manifests(manifest, cfg, storage, rank.rank, broadcast_object)
        # Not for a loader of another's checked manifests (pca's sample pass): that one warns.
        self._no_features = _NoFeaturesWarning(features_dim if rank.rank == 0 and any(c for _, c in loaded) else None)
        self.manifests = [m for m, _ in loaded]   # checked: another loader may take them as they are
        self.cfg, self.manifest = cfg, self.manifests[0]
        # The sample fields each manifest declares, in order (what a run can use: teacher scores...).
        self.manifest_fields = [list(m.get("fields") or ()) for m in self.manifests]
        self._sources = [Source(m, storage) for m in self.manifests]
        # Reported by the loader whose check found it (a second loader would repeat the lines).
        _warn_damage([src for src, (_, checked) in zip(self._sources, loaded) if checked])
        self.batch_size, self.rank, self.world_size = batch_size, rank.rank, rank.world_size
        self.seed, self.tokens = seed, tokens
        self.infinite = cfg.infinite or cfg.mix is not None
        weights = None if cfg.mix is None else [m.weight for m in cfg.mix]
        self._plan = Plan(self._sources, weights, seed, cfg.block_size, cfg.interleave_shards,
                          cfg.shuffle_buffer, self.infinite)
        self.num_samples = sum(s.num_samples for s in self._sources)
        self.batches_per_epoch = self._sources[0].num_samples // self.global_batch
        if self.batches_per_epoch == 0 and not self.infinite:
            raise DataError(f"{self.manifest.get('path', 'manifest')}: {self.num_samples} samples "
                            f"cannot fill one global batch of {batch_size} x {self.world_size} ranks")
        self.epoch = 0
        self.samples_consumed = 0  # global positions of the current epoch already yielded
        self._history: list[list[int]] = []   # [world, batch, slots read per rank] per layout
        self._current: tuple[tuple, Any] | None = None
        # Samples that left the order at start (missing shards, truncated tails): counted
        # once here, so every rank reports them (sum ranks' counts of the other reasons only).
        self._errors: dict[str, int] = {}
        for src in self._sources:
            for reason, n in src.lost.items():
                self._errors[reason] = self._errors.get(reason, 0) + n
        self._io = {"io_requests": 0, "io_bytes_read": 0, "io_bytes_used": 0, "io_metadata": 0}
        self._add_counts({"retries": storage.stats.retries, "io_requests": storage.stats.requests,
                          "io_metadata": storage.stats.metadata,
                          "io_bytes_read": storage.stats.bytes_read})
        storage.close()

    @classmethod
    def from_config(cls, cfg: DataConfig, batch_size: int, rank: Rank = Rank(), seed: int = 0,
                    tokens: PairTokenizer | None = None,
                    broadcast_object: Callable[[Any], Any] | None = None,
                    features_dim: int | None = None) -> "ClickPairLoader":
        """The loader a ``DataConfig`` describes, reading its manifests (``train_manifest``,
        or those of ``mix``), their shard files checked at once.

        Args:
            cfg: the data config.
            batch_size: pairs per batch on this rank (``train.batch_size``).
            rank: this rank and the world size.
            seed: seed of the epoch orders (``train.seed``).
            tokens: the towers' tokenizer and token limits; None: texts only.
            broadcast_object: in a distributed run, rank 0's object on every rank (see the
                class docstring): then only rank 0 checks the shard files.
            features_dim: the model's ``item_features_dim`` (None: no feature rows).

        Raises:
            ValueError: the config names no manifest.
            DataError: a manifest or its shard files are missing or malformed.
        """
        manifests = cfg.manifests()
        if not manifests:
            raise ValueError("data.train_manifest (or data.mix) is required to read training data")
        return cls(cfg, manifests if cfg.mix is not None else manifests[0], batch_size, rank, seed, tokens,
                   broadcast_object, features_dim)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _segment(self):
        """The segment being read and the slots this rank has read of it."""
        key = (self.epoch, tuple(map(tuple, self._history[:-1])),
               tuple(self._history[-1][:2]) if self._history else None)
        if self._current is None or self._current[0] != key:
            self._current = (key, self._plan.segment(self.epoch, [list(h) for h in self._history],
                                                     self.world_size, self.batch_size)[0])
        segment = self._current[1]
        if not self._history or self._history[-1][:2] != [self.world_size, self.batch_size]:
            return segment, 0
        return segment, self._history[-1][2]

    def remaining_batches(self) -> int | None:
        """Batches every rank still yields in the current epoch (None when infinite)."""
        if self.infinite:
            return None
        segment, consumed = self._segment()
        return segment.num_batches(consumed)

    def error_counts(self) -> dict[str, int]:
        """Bad samples this rank skipped since the loader was built, by reason (all reasons
        listed, zeros included), and ``retries`` (transient read errors retried), for
        metrics; with ``features_dim``, also ``missing_features`` (item rows without a vector)."""
        counts = {reason: self._errors.get(reason, 0) for reason in ERROR_REASONS}
        return counts if self.features_dim is None else {**counts, "missing_features": self._missing_features}

    def io_counts(self) -> dict[str, int]:
        """What this rank's readers did since the loader was built: requests (ranged and
        whole reads), bytes read, bytes of the samples used, metadata calls."""
        return dict(self._io)

    def _add_counts(self, counts: dict[str, int]) -> None:
        for name, n in counts.items():
            table = self._errors if name in ERROR_REASONS else self._io
            table[name] = table.get(name, 0) + n

    def _fingerprint(self) -> list[int]:
        return [s.num_samples for s in self._sources]

    def state_dict(self) -> dict[str, Any]:
        """The position of the stream: epoch, global positions consumed in it and the
        layouts it was read under, plus what the order depends on (seed, sample counts,
        mode, order settings) so that a resume can check them."""
        return {"epoch": self.epoch, "samples_consumed": self.samples_consumed, "seed": self.seed,
                "segments": [list(h) for h in self._history],
                "num_samples": self._fingerprint(), "infinite": self.infinite,
                "shuffle_buffer": self.cfg.shuffle_buffer, "block_size": self.cfg.block_size,
                "interleave_shards": self.cfg.interleave_shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a position saved by ``state_dict`` (any world size, batch size or
        worker count).

        A shard set that grew since (``clicktower shard --append``) cannot continue the
        saved epoch's order: the loader starts the next epoch on the grown set (with a
        warning), so the unread rest of the saved epoch is not read in that epoch.

        Args:
            state: at least ``{"epoch", "samples_consumed"}``; the other keys, when present,
                must match this loader (a different seed or data would change the order).
        """
        saved = state.get("num_samples")
        if saved is not None and saved != self._fingerprint() and not self.infinite \
                and len(saved) == len(self._fingerprint()) \
                and all(a <= b for a, b in zip(saved, self._fingerprint())):
            log.warning("the shard set grew from %s to %s samples since the checkpoint: "
                        "starting epoch %d on the grown set (the rest of epoch %d is not read)",
                        saved, self._fingerprint(), int(state["epoch"]) + 1, int(state["epoch"]))
            self.epoch, self.samples_consumed, self._history = int(state["epoch"]) + 1, 0, []
            return
        for key, mine in (("seed", self.seed), ("num_samples", self._fingerprint()),
                          ("infinite", self.infinite), ("shuffle_buffer", self.cfg.shuffle_buffer),
                          ("block_size", self.cfg.block_size),
                          ("interleave_shards", self.cfg.interleave_shards)):
            if key in state and state[key] != mine:
                raise DataError(f"cannot resume: the saved loader state has {key}={state[key]!r}, "
                                f"this loader {key}={mine!r} (the sample order would differ)")
        consumed = int(state["samples_consumed"])
        history = [list(map(int, h)) for h in state.get("segments", [])]
        if "segments" not in state and consumed:
            # No layouts saved (a hand-made state): read under this world and batch size.
            if consumed % self.global_batch:
                raise DataError(f"cannot resume at sample {consumed}: a state without "
                                f"'segments' must be whole global batches of this loader "
                                f"({self.global_batch})")
            history = [[self.world_size, self.batch_size, consumed // self.world_size]]
        if consumed < 0 or sum(w * c for w, _, c in history) != consumed or any(
                w < 1 or b < 1 or c < 0 or c % b for w, b, c in history):
            raise DataError(f"cannot resume at sample {consumed}: the saved layouts "
                            f"{history} do not add up to it")
        if not self.infinite and consumed > self._sources[0].num_samples:
            raise DataError(f"cannot resume at sample {consumed}: outside the epoch")
        self.epoch, self.samples_consumed, self._history = int(state["epoch"]), consumed, history

    def _stream(self) -> RankStream:
        segment, consumed = self._segment()
        if not self._history or self._history[-1][:2] != [self.world_size, self.batch_size]:
            self._history.append([self.world_size, self.batch_size, 0])
            self._current = None
            self._segment()   # the same segment, now keyed under the new history
        return RankStream(self, segment, consumed, segment.num_batches(consumed))

    def _batches(self, stream: RankStream) -> Iterable[list[PairBatch] | dict]:
        """The stream's window items in order: read in this process (``num_workers=0``) or
        by DataLoader's worker processes, taken round-robin."""
        if self.cfg.num_workers == 0:
            return stream.batches(0, 1)
        # Its own generator: without one, DataLoader draws the workers' base seed from the
        # global torch RNG at every pass, which shifts every later dropout mask by one draw,
        # so a run resumed mid-epoch (a new pass) would leave the uninterrupted run's stream.
        return DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                          persistent_workers=False, prefetch_factor=4,
                          generator=torch.Generator().manual_seed(self.seed))

    def __iter__(self) -> Iterator[PairBatch]:
        """Yield the rest of the current epoch, then move the state to the next epoch."""
        for item in self._batches(self._stream()):
            if isinstance(item, dict):   # a worker's error: {"__error__": message}
                raise DataError(item["__error__"])
            for batch in item:   # one window's batches
                # Counted here, not in collate: collate may run in a worker process.
                counts, batch.counts = batch.counts, {}
                missing = int(counts.pop("missing_features", 0))
                self._missing_features += missing
                self._no_features.see(batch, missing)
                self._add_counts(counts)
                self.samples_consumed += self.global_batch
                self._history[-1][2] += self.batch_size
                yield batch
        self._no_features.finish()  # an epoch of fewer batches than the warning waits for
        if not self.infinite:
            self.epoch += 1
            self.samples_consumed = 0
            self._history, self._current = [], None

    def collate(self, samples: list[dict]) -> PairBatch:
        """Turn samples into a batch: keys, texts, labels, token tensors and feature rows.

        Args:
            samples: decoded samples from the shards.
        """
        return _collate(samples, self.cfg, self.tokens, self.features_dim)
