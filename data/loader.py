"""Streaming click-pair batches from indexed WebDataset shards to every rank and loader worker.

The epoch order
---------------
An epoch is one deterministic global order of the manifest's ``N`` samples, computed from
the shard sample counts and the seed alone (no data is read to know it):

1. a seeded permutation of the shards, concatenated;
2. inside each shard, a seeded permutation of blocks of ``block_size`` samples;
3. a seeded permutation inside consecutive windows of ``shuffle_buffer`` positions of that
   sequence (a stateless stand-in for a shuffle buffer: it mixes across shard boundaries the
   same way, and position ``p`` maps to its sample in O(log shards) without replaying the
   stream).

Global position ``p`` belongs to global batch ``g = p // (world_size * batch_size)``; inside
it rank ``r`` owns the ``batch_size`` consecutive positions starting at
``g * world_size * batch_size + r * batch_size`` (split by sample, not by shard). Local batch
``j`` of a rank is built by loader worker ``j % num_workers``; PyTorch's ``DataLoader`` takes
workers round-robin, so the batches come out in order for any worker count. Every worker
reads only the samples of its own batches, seeking with the per-sample index.

Every rank yields ``(N - samples_consumed) // (world_size * batch_size)`` batches. The
remainder (fewer than one global batch) is dropped for that epoch; the next epoch has a new
order, so a different remainder is dropped each time.

Resume: the state is ``{"epoch", "samples_consumed", ...}`` in global positions and holds no
rank or worker. Since the order is fixed by the seed, any consumed count works for any world
size and worker count: the ranks take the next global batches from ``samples_consumed`` on.
Within an epoch every position is read at most once across all resumes; the positions left
after the last full global batch are the dropped remainder.

Bad data
--------
Which positions an epoch has, and so how many batches every rank yields, depends only on the
manifest counts. A sample that turns out bad when read (truncated tar, corrupt gzip, invalid
UTF-8 or JSON, a missing field, empty or absurdly long text, a duplicate key, a shard that
was missing when the loader started) is, with ``on_error="skip"`` (default), left out of its
batch: that batch is one sample short on that rank, no other sample moves, and batch counts
never differ between ranks. It is counted by reason (``error_counts()``) and logged with its
shard and key (the first 3 of each reason per worker, then at 10, 100, 1000...). With
``on_error="raise"`` the loader stops with a ``DataError`` naming the shard and key. Missing
or wrong-sized shards and indexes are found when the loader starts (manifest validation).

Modes
-----
``data.infinite: true`` chains epochs without end (no remainder is dropped;
``epoch`` stays 0 and ``samples_consumed`` counts global positions since the start). Several
manifests weighted by ``data.mix: [{manifest, weight}, ...]`` are mixed in a fixed, seeded
pattern of period 1000 (e.g. 700 clicks, 300 purchases per 1000 positions); each source is
read in its own epoch orders, so a source's samples repeat only after all of them were used.
Mixing is always infinite.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import zlib
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clicktower.data.errors import DataError
from clicktower.data.shards import (SampleError, ShardTable, decode_sample_bytes,
                                    load_manifest, split_members)

log = logging.getLogger("clicktower.data")

ON_ERROR = ("skip", "raise")
ERROR_REASONS = ("missing_shard", "truncated", "corrupt_tar", "corrupt_gzip", "invalid_utf8",
                 "invalid_json", "missing_field", "empty_text", "text_too_long",
                 "duplicate_key", "bad_features")
MIX_PERIOD = 1000


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
        block_size: samples per block in the in-shard block shuffle.
        infinite: chain epochs without end instead of stopping at each epoch.
        hard_negatives_per_query: hard negatives of each sample (its ``hard_negatives`` field)
            added to the batch as extra negatives for every query (0: none).
        pad_to_multiple_of: token tensors are padded to the batch's longest text rounded up
            to this (8 suits GPU tensor cores; 1 pads no further, which is cheaper on CPUs).
    """

    train_manifest: str | None = None
    mix: list[MixEntry] | None = None
    num_workers: int = 0
    shuffle_buffer: int = 1000
    on_error: str = "skip"
    max_text_chars: int = 20_000
    block_size: int = 64
    infinite: bool = False
    hard_negatives_per_query: int = 0
    pad_to_multiple_of: int = 8

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


def stable_id(text: str) -> int:
    """A process-independent non-negative int64 id for a string (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in words]))


# --------------------------------------------------------------------------------------
# The order: position -> (shard, sample), from counts and seed only
# --------------------------------------------------------------------------------------

class _Source:
    """One manifest in compact form: what the order and the readers need. The shard table is
    the manifest's ``ShardTable`` (arrays, no per-shard dicts); a shard's index is loaded
    only when a reader opens that shard."""

    def __init__(self, manifest: dict):
        table = manifest["shards"]
        self.table = table
        self.name = manifest.get("path", "manifest")
        self.gzip_blocks = table.gzip_blocks
        self.listed = table.counts   # as in the index (counts below may shrink)
        self.counts = table.counts.copy()
        self.missing, self.damaged = table.missing, table.damaged
        # Index-level validation: a missing shard, and the samples past the end of a
        # truncated one, leave the order before the first batch. Every rank computes this
        # from the same files, so all agree on the batch count (a per-sample skip later
        # could not move positions without making the ranks disagree).
        self.lost = {"missing_shard": 0, "truncated": 0}
        for i in self.missing:
            self.lost["missing_shard"] += int(self.counts[i])
            self.counts[i] = 0
        for i in self.damaged:
            intact = _intact_samples(table[i])
            self.lost["truncated"] += int(self.counts[i]) - intact
            self.counts[i] = intact
        self.num_samples = int(self.counts.sum())

    def path(self, shard: int) -> str:
        return self.table.path(shard)

    def index(self, shard: int) -> str | None:
        return self.table.index(shard)


def _intact_samples(shard: dict) -> int:
    """Samples of a shorter-than-listed shard that lie wholly inside the file."""
    n = shard["num_samples"]
    if shard["index"] is None:
        return 0
    try:
        size = os.path.getsize(shard["path"])
        index = np.load(shard["index"], mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return 0
    if size >= shard["bytes"] or len(index) < n + 1:
        return n if len(index) >= n + 1 else 0   # modified, not cut: read and see
    gb = shard.get("gzip_block") or 0
    if not gb:
        return int(np.searchsorted(np.asarray(index[: n + 1]), size, side="right")) - 1
    blocks = np.asarray(index[n + 1:])
    whole = int(np.searchsorted(blocks, size, side="right")) - 1   # blocks wholly present
    return min(n, max(0, whole) * gb)


class _EpochOrder:
    """Maps stream position ``t`` in ``[0, N)`` of one epoch to ``(shard, sample index)``."""

    def __init__(self, source: _Source, seed: int, epoch: int, window: int, block_size: int):
        self.source, self.seed, self.epoch = source, seed, epoch
        self.window, self.block_size = window, block_size
        self.perm = _rng(seed, epoch, 0).permutation(len(source.counts))
        # an array, not a list: 8 bytes a shard (a Python int list costs ~36)
        self.starts = np.concatenate([[0], np.cumsum(source.counts[self.perm])])
        self._window_cache: tuple[int, np.ndarray] | None = None
        self._block_cache: OrderedDict[int, tuple[list[int], np.ndarray]] = OrderedDict()

    def _window_perm(self, w: int) -> np.ndarray:
        if self._window_cache is None or self._window_cache[0] != w:
            size = min(self.window, self.source.num_samples - w * self.window)
            self._window_cache = (w, _rng(self.seed, self.epoch, 1, w).permutation(size))
        return self._window_cache[1]

    def _blocks(self, shard: int) -> tuple[list[int], np.ndarray]:
        entry = self._block_cache.get(shard)
        if entry is None:
            count, bs = int(self.source.counts[shard]), self.block_size
            nblocks = -(-count // bs)
            order = _rng(self.seed, self.epoch, 2, shard).permutation(nblocks)
            sizes = np.full(nblocks, bs, dtype=np.int64)
            if nblocks:
                sizes[-1] = count - (nblocks - 1) * bs
            entry = (np.cumsum(sizes[order]).tolist(), order)
            self._block_cache[shard] = entry
            if len(self._block_cache) > 64:
                self._block_cache.popitem(last=False)
        return entry

    def locate(self, t: int) -> tuple[int, int]:
        w, within = divmod(t, self.window)
        t = w * self.window + int(self._window_perm(w)[within])
        slot = int(np.searchsorted(self.starts, t, side="right")) - 1
        shard = int(self.perm[slot])
        q = t - int(self.starts[slot])
        ends, order = self._blocks(shard)
        k = bisect_right(ends, q)
        block_start = ends[k - 1] if k else 0
        return shard, int(order[k]) * self.block_size + (q - block_start)


class _Plan:
    """Global position -> (source, shard, sample) for the finite, infinite and mixed modes."""

    def __init__(self, sources: list[_Source], weights: list[float] | None, seed: int,
                 window: int, block_size: int, infinite: bool):
        self.sources, self.seed, self.window, self.block_size = sources, seed, window, block_size
        self.infinite = infinite or len(sources) > 1
        self._orders: dict[tuple[int, int], _EpochOrder] = {}
        if len(sources) > 1:
            w = np.asarray(weights, dtype=np.float64)
            counts = np.floor(w / w.sum() * MIX_PERIOD).astype(np.int64)
            # largest remainders get the leftover slots, so the counts sum to the period
            rest = np.argsort(-(w / w.sum() * MIX_PERIOD - counts), kind="stable")
            counts[rest[: MIX_PERIOD - counts.sum()]] += 1
            pattern = np.repeat(np.arange(len(sources)), counts)
            self.pattern = _rng(seed, 3).permutation(pattern)
            onehot = np.zeros((MIX_PERIOD + 1, len(sources)), dtype=np.int64)
            onehot[np.arange(1, MIX_PERIOD + 1), self.pattern] = 1
            self.prefix = np.cumsum(onehot, axis=0)   # draws of each source before slot i
            self.per_period = counts

    def order(self, source: int, epoch: int) -> _EpochOrder:
        key = (source, epoch)
        order = self._orders.get(key)
        if order is None:
            if len(self._orders) > 4:
                self._orders.clear()
            order = self._orders[key] = _EpochOrder(self.sources[source], self.seed + 7919 * source,
                                                    epoch, self.window, self.block_size)
        return order

    def locate(self, epoch: int, p: int) -> tuple[int, int, int, int]:
        """``(source, source epoch, shard, sample)`` at global position ``p`` (of ``epoch``
        when finite)."""
        if len(self.sources) == 1:
            n = self.sources[0].num_samples
            if self.infinite:
                epoch, p = divmod(p, n)
            return (0, epoch, *self.order(0, epoch).locate(p))
        period, slot = divmod(p, MIX_PERIOD)
        k = int(self.pattern[slot])
        draw = period * int(self.per_period[k]) + int(self.prefix[slot, k])
        e, t = divmod(draw, self.sources[k].num_samples)
        return (k, e, *self.order(k, e).locate(t))


# --------------------------------------------------------------------------------------
# Reading one sample through the index
# --------------------------------------------------------------------------------------

def _scan_offsets(path: str) -> np.ndarray:
    """Sample offsets of a version-1 shard (no index file): one pass over its tar headers."""
    import tarfile

    offsets, last_key, end = [], None, 0
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            key = os.path.basename(member.name).partition(".")[0]
            if key != last_key:
                offsets.append(member.offset)
                last_key = key
            end = member.offset_data + member.size + (-member.size % 512)
    return np.asarray(offsets + [end], dtype=np.uint64)


class _ShardReader:
    """Reads samples by (shard, index) with ``os.pread``; a few shards are kept open (the
    memory does not grow with the number of shards)."""

    def __init__(self, source: _Source, max_open: int = 16):
        self.source, self.max_open = source, max_open
        self._open: OrderedDict[int, tuple[int, np.ndarray, np.ndarray | None]] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def close(self):
        for fd, _, _ in self._open.values():
            os.close(fd)
        self._open.clear()
        self._blocks.clear()

    def _handle(self, shard: int):
        handle = self._open.get(shard)
        if handle is not None:
            self._open.move_to_end(shard)
            return handle
        path, n = self.source.path(shard), int(self.source.listed[shard])
        index_file = self.source.index(shard)
        fd = os.open(path, os.O_RDONLY)
        try:
            if index_file is None:
                index = _scan_offsets(path)
            else:
                # mmap: only the pages of the offsets actually read come into memory
                index = np.load(index_file, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            os.close(fd)
            raise SampleError("truncated", f"unreadable index ({exc})") from None
        offsets, blocks = index[: n + 1], (index[n + 1:] if self.source.gzip_blocks[shard] else None)
        handle = self._open[shard] = (fd, offsets, blocks)
        if len(self._open) > self.max_open:
            old_fd, _, _ = self._open.popitem(last=False)[1]
            os.close(old_fd)
        return handle

    def read(self, shard: int, i: int) -> bytes:
        """The tar bytes of sample ``i`` of ``shard``."""
        fd, offsets, blocks = self._handle(shard)
        start, end = int(offsets[i]), int(offsets[i + 1])
        gb = int(self.source.gzip_blocks[shard])
        if not gb:
            data = os.pread(fd, end - start, start)
            if len(data) < end - start:
                raise SampleError("truncated", f"shard ends at byte {start + len(data)}, the "
                                  f"sample needs {end}")
            return data
        b = i // gb
        raw = self._blocks.get((shard, b))
        if raw is None:
            lo, hi = int(blocks[b]), int(blocks[b + 1])
            comp = os.pread(fd, hi - lo, lo)
            try:
                raw = zlib.decompressobj(-15).decompress(comp)
            except zlib.error as exc:
                raise SampleError("corrupt_gzip", f"gzip block {b}: {exc}") from None
            self._blocks[(shard, b)] = raw
            if len(self._blocks) > 8:
                self._blocks.popitem(last=False)
        base = int(offsets[b * gb])
        data = raw[start - base:end - base]
        if len(data) < end - start:   # a cut-short file inflates to a short block
            raise SampleError("truncated", f"gzip block {b} inflates to {len(raw)} bytes, the "
                              f"sample needs {end - base}")
        return data


# --------------------------------------------------------------------------------------
# One rank's stream, split over workers
# --------------------------------------------------------------------------------------

class _Worker:
    """Per-process reading state: readers, bad-data counters, recent keys."""

    def __init__(self, stream: "_RankStream"):
        self.stream = stream
        self.readers = [_ShardReader(s) for s in stream.sources]
        self.errors: dict[str, int] = {}
        self.recent: OrderedDict[tuple, None] = OrderedDict()
        self.recent_limit = max(4 * stream.window, 4096)

    def bad(self, source: int, shard: int, reason: str, message: str, key: str | None):
        path = self.stream.sources[source].path(shard)
        where = f"sample {key!r}: " if key else ""
        n = self.errors[reason] = self.errors.get(reason, 0) + 1
        if self.stream.on_error == "raise":
            raise DataError(f"{where}{message} (data.on_error=raise; 'skip' skips and counts)",
                            source=path)
        if n <= 3 or str(n).rstrip("0") == "1":  # 1, 2, 3, 10, 100, 1000...: rate-limited
            log.warning("skipping bad sample (%s, %d so far in this worker): %s: %s%s",
                        reason, n, path, where, message)

    def sample(self, source: int, epoch: int, shard: int, i: int) -> dict | None:
        src = self.stream.sources[source]
        if shard in src.missing:
            self.bad(source, shard, "missing_shard", src.missing[shard], None)
            return None
        key = None
        try:
            key, members = split_members(self.readers[source].read(shard, i))
            sample = decode_sample_bytes(members, key, self.stream.max_text_chars)
        except SampleError as exc:
            self.bad(source, shard, exc.reason, exc.message, exc.key or key)
            return None
        except OSError as exc:
            self.bad(source, shard, "missing_shard", f"cannot read ({exc})", key)
            return None
        # A key may come back in the next pass over a source (infinite or mixed mode), and
        # two mixed sources may reuse keys: only a repeat within one pass is a duplicate.
        seen = (source, epoch, key)
        if seen in self.recent:
            self.bad(source, shard, "duplicate_key", "key already seen (duplicate)", key)
            return None
        self.recent[seen] = None
        if len(self.recent) > self.recent_limit:
            self.recent.popitem(last=False)
        return sample


class _RankStream(IterableDataset):
    """The rest of one epoch (or of the infinite stream) for one rank, split over workers."""

    def __init__(self, loader: "ClickPairLoader", epoch: int, start: int, num_batches: int | None):
        self.sources, self.plan = loader._sources, loader._plan
        self.batch_size, self.rank, self.world_size = loader.batch_size, loader.rank, loader.world_size
        self.window, self.on_error = loader.cfg.shuffle_buffer, loader.cfg.on_error
        self.max_text_chars, self.collate = loader.cfg.max_text_chars, loader.collate
        self.epoch, self.start, self.num_batches = epoch, start, num_batches

    def positions(self, j: int) -> range:
        """Global positions of this rank's ``j``-th batch from the start."""
        first = self.start + j * self.batch_size * self.world_size + self.rank * self.batch_size
        return range(first, first + self.batch_size)

    def batches(self, worker: int, num_workers: int) -> Iterator[dict]:
        """The batches of worker ``worker`` of ``num_workers`` (``j % num_workers == worker``)."""
        state = _Worker(self)
        j = worker
        try:
            while self.num_batches is None or j < self.num_batches:
                samples = []
                try:
                    for p in self.positions(j):
                        sample = state.sample(*self.plan.locate(self.epoch, p))
                        if sample is not None:
                            samples.append(sample)
                except DataError as exc:
                    yield {"__error__": str(exc)}
                    return
                if not samples:
                    # Only dense damage gets here (sparse bad samples just shorten a
                    # batch): an empty batch would desynchronise DDP, so stop instead.
                    yield {"__error__": f"every sample of batch {j} on rank {self.rank} is "
                                        f"bad (see the warnings above); re-shard the damaged "
                                        f"shards or raise data.shuffle_buffer"}
                    return
                batch = self.collate(samples)
                batch["__errors__"], state.errors = state.errors, {}
                yield batch
                j += num_workers
        finally:
            for reader in state.readers:
                reader.close()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is None:
            return self.batches(0, 1)
        torch.set_num_threads(1)   # one tokenising core per worker
        return self.batches(info.id, info.num_workers)


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


def _load_manifests(manifest: str | dict | Sequence[str | dict], cfg: DataConfig) -> list[dict]:
    """The loaded manifest(s) the loader reads: one, or one per ``cfg.mix`` entry.

    Args:
        manifest: path of ``manifest.json`` (or its folder), a loaded manifest, or (with
            ``cfg.mix``) a list of those in ``cfg.mix`` order.
        cfg: the data config (its ``mix`` and ``on_error``).
    """
    manifests = list(manifest) if isinstance(manifest, (list, tuple)) else [manifest]
    if len(manifests) != (1 if cfg.mix is None else len(cfg.mix)):
        raise ValueError(f"{len(manifests)} manifests given: mixing manifests needs data.mix "
                         f"with one mix weight each, in the same order")
    on_missing = "raise" if cfg.on_error == "raise" else "skip"
    loaded = []
    for m in manifests:
        if not isinstance(m, dict):
            m = load_manifest(m, on_missing=on_missing)
        elif not isinstance(m.get("shards"), ShardTable):
            if "path" not in m:
                raise ValueError("a manifest dict must come from load_manifest")
            m = load_manifest(m["path"], on_missing=on_missing)
        elif m.get("on_missing") not in (on_missing, "raise"):
            # Loaded under the other policy: "skip" let problems through that "raise"
            # must report. (A manifest that passed "raise" is reused as is: loading
            # again would stat every shard a second time.)
            m = load_manifest(m["path"], on_missing=on_missing)
        loaded.append(m)
    return loaded


def _warn_damage(sources: list[_Source]) -> None:
    """Log the missing and damaged shards found at start (the first 3 of each, then totals)."""
    for src in sources:
        for why in list(src.missing.values())[:3]:
            log.warning("data.on_error=skip: %s: its samples leave the order", why)
        for why in list(src.damaged.values())[:3]:
            log.warning("data.on_error=skip: %s: reading the samples that are there", why)
        if len(src.missing) + len(src.damaged) > 6:
            log.warning("data.on_error=skip: %d shards missing, %d damaged in all",
                        len(src.missing), len(src.damaged))


class ClickPairLoader:
    """Batches of (query, item) pairs for one rank, resumable to the exact sample on any
    world size and worker count (see the module docstring for the order and the rules).

    Everything about reading (workers, shuffle, bad data, mode, hard negatives, padding)
    comes from ``cfg``; mixing and ``cfg.infinite`` make the stream endless.

    Args:
        cfg: the data config (already validated by ``DataConfig``).
        manifest: path of ``manifest.json`` (or its folder) or a loaded manifest; with
            ``cfg.mix``, a list of those in ``cfg.mix`` order (the weights come from
            ``cfg.mix``).
        batch_size: pairs per batch on this rank.
        rank: this rank and the world size.
        seed: seed of the epoch orders.
        tokens: the tokenizer and token limits; without it, batches carry texts only.
    """

    def __init__(self, cfg: DataConfig, manifest: str | dict | Sequence[str | dict],
                 batch_size: int, rank: Rank = Rank(), seed: int = 0,
                 tokens: PairTokenizer | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        loaded = _load_manifests(manifest, cfg)
        self.cfg, self.manifest = cfg, loaded[0]
        self._sources = [_Source(m) for m in loaded]
        _warn_damage(self._sources)
        self.batch_size, self.rank, self.world_size = batch_size, rank.rank, rank.world_size
        self.seed, self.tokens = seed, tokens
        self.infinite = cfg.infinite or cfg.mix is not None
        weights = None if cfg.mix is None else [m.weight for m in cfg.mix]
        self._plan = _Plan(self._sources, weights, seed, cfg.shuffle_buffer, cfg.block_size,
                           self.infinite)
        self.num_samples = sum(s.num_samples for s in self._sources)
        self.batches_per_epoch = self._sources[0].num_samples // self.global_batch
        if self.batches_per_epoch == 0 and not self.infinite:
            raise DataError(f"{self.manifest.get('path', 'manifest')}: {self.num_samples} samples "
                            f"cannot fill one global batch of {batch_size} x {self.world_size} ranks")
        self.epoch = 0
        self.samples_consumed = 0  # global positions of the current epoch already yielded
        # Samples that left the order at start (missing shards, truncated tails): counted
        # once here, so every rank reports them (sum ranks' counts of the other reasons only).
        self._errors: dict[str, int] = {}
        for src in self._sources:
            for reason, n in src.lost.items():
                self._errors[reason] = self._errors.get(reason, 0) + n

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def remaining_batches(self) -> int | None:
        """Batches every rank still yields in the current epoch (None when infinite)."""
        if self.infinite:
            return None
        return max(0, self._sources[0].num_samples - self.samples_consumed) // self.global_batch

    def error_counts(self) -> dict[str, int]:
        """Bad samples this rank skipped since the loader was built, by reason (all reasons
        listed, zeros included), for metrics."""
        return {reason: self._errors.get(reason, 0) for reason in ERROR_REASONS}

    def _fingerprint(self) -> list[int]:
        return [s.num_samples for s in self._sources]

    def state_dict(self) -> dict[str, Any]:
        """The position of the stream: epoch and global positions consumed in it, plus what
        the order depends on (seed, sample counts, mode) so that a resume can check them."""
        return {"epoch": self.epoch, "samples_consumed": self.samples_consumed, "seed": self.seed,
                "num_samples": self._fingerprint(), "infinite": self.infinite,
                "shuffle_buffer": self.cfg.shuffle_buffer, "block_size": self.cfg.block_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a position saved by ``state_dict`` (any world size or worker count).

        Args:
            state: at least ``{"epoch", "samples_consumed"}``; the other keys, when present,
                must match this loader (a different seed or data would change the order).
        """
        for key, mine in (("seed", self.seed), ("num_samples", self._fingerprint()),
                          ("infinite", self.infinite), ("shuffle_buffer", self.cfg.shuffle_buffer),
                          ("block_size", self.cfg.block_size)):
            if key in state and state[key] != mine:
                raise DataError(f"cannot resume: the saved loader state has {key}={state[key]!r}, "
                                f"this loader {key}={mine!r} (the sample order would differ)")
        consumed = int(state["samples_consumed"])
        if consumed < 0 or (not self.infinite and consumed > self._sources[0].num_samples):
            raise DataError(f"cannot resume at sample {consumed}: outside the epoch")
        self.epoch, self.samples_consumed = int(state["epoch"]), consumed

    def _stream(self) -> _RankStream:
        return _RankStream(self, self.epoch, self.samples_consumed, self.remaining_batches())

    def _batches(self, stream: _RankStream) -> Iterable[dict]:
        """The stream's batches in order: read in this process (``num_workers=0``) or by
        DataLoader's worker processes, taken round-robin."""
        if self.cfg.num_workers == 0:
            return stream.batches(0, 1)
        # Its own generator: without one, DataLoader draws the workers' base seed from the
        # global torch RNG at every pass, which shifts every later dropout mask by one draw,
        # so a run resumed mid-epoch (a new pass) would leave the uninterrupted run's stream.
        return DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                          persistent_workers=False, prefetch_factor=4,
                          generator=torch.Generator().manual_seed(self.seed))

    def __iter__(self) -> Iterator[dict]:
        """Yield the rest of the current epoch, then move the state to the next epoch."""
        for batch in self._batches(self._stream()):
            if "__error__" in batch:
                raise DataError(batch["__error__"])
            for reason, n in batch.pop("__errors__", {}).items():
                self._errors[reason] = self._errors.get(reason, 0) + n
            self.samples_consumed += self.global_batch
            yield batch
        if not self.infinite:
            self.epoch += 1
            self.samples_consumed = 0

    def collate(self, samples: list[dict]) -> dict[str, Any]:
        """Turn samples into a batch: keys, texts, int64 item ids, and token tensors.

        Args:
            samples: decoded samples from the shards.
        """
        batch: dict[str, Any] = {
            "keys": [s["__key__"] for s in samples],
            "queries": [s["query"] for s in samples],
            "items": [s["item_text"] for s in samples],
            "item_ids": torch.tensor([stable_id(str(s["item_id"])) for s in samples], dtype=torch.long),
            "query_ids": torch.tensor([stable_id(s["query"]) for s in samples], dtype=torch.long),
        }
        if any("weight" in s for s in samples):
            batch["weights"] = torch.tensor([float(s.get("weight", 1.0)) for s in samples])
        if any("hard_negatives" in s for s in samples):
            batch["hard_negatives"] = [s.get("hard_negatives", []) for s in samples]
        if samples and all("features" in s for s in samples):
            shapes = {np.shape(s["features"]) for s in samples}
            if len(shapes) == 1:
                batch["item_features"] = torch.from_numpy(np.stack([s["features"] for s in samples]))
        items = batch["items"]
        per_query = self.cfg.hard_negatives_per_query
        if per_query and self.tokens is not None:
            negatives = [n for s in samples for n in s.get("hard_negatives", [])[:per_query]]
            # Tokenised WITH the items: one item-tower forward embeds both, so every rank runs
            # the same number of forward passes (ZeRO-3) whatever its negative count.
            items = items + [n["item_text"] for n in negatives]
            batch["hard_negative_ids"] = torch.tensor([stable_id(str(n["item_id"])) for n in negatives],
                                                      dtype=torch.long)
        batch["num_items"] = len(samples)
        if self.tokens is not None:
            batch.update(self.tokens(batch["queries"], items, self.cfg.pad_to_multiple_of))
        return batch

