"""One rank's stream of batches: the manifests as sources, the plan of segments, and the
worker-side reading of windows (see ``clicktower.data.order`` for the order itself).

A loader worker reads whole windows: the runs of samples a window needs are fetched with
one ranged request each, a few windows ahead (``Prefetcher``), then decoded and cut into the
window's batches. DataLoader takes items round-robin from its workers, so an item is a
window (a list of batches), and window ``i`` of the stream is read by worker
``i % num_workers``: every worker reads only its own windows' bytes, and the batches come
out in the same order for any worker count.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from functools import partial
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from clicktower.data.batch import PairBatch
from clicktower.data.blockio import BlockReader, NodeCache, Prefetcher, run_failure
from clicktower.data.errors import DataError
from clicktower.data.manifest import ShardTable
from clicktower.data.order import (MIX_PERIOD, EpochOrder, Pieces, Segment, SourceSegment, rng,
                                   window_size)
from clicktower.data.shards import SampleError, decode_sample_bytes, split_members
from clicktower.data.storage import Storage

log = logging.getLogger("clicktower.data")

ERROR_REASONS = ("missing_shard", "truncated", "corrupt_tar", "corrupt_gzip", "invalid_utf8",
                 "invalid_json", "missing_field", "empty_text", "text_too_long",
                 "duplicate_key", "bad_features", "io_error", "retries")
_ORDERS_KEPT = 4


class Source:
    """One manifest in compact form: what the order and the readers need. The shard table is
    the manifest's ``ShardTable`` (arrays, no per-shard dicts); a shard's index is read only
    when a reader needs its entries.

    Args:
        manifest: from ``load_manifest`` with its files checked.
        storage: to measure what is left of a damaged shard.
    """

    def __init__(self, manifest: dict, storage: Storage):
        table: ShardTable = manifest["shards"]
        self.table = table
        self.name = manifest.get("path", "manifest")
        self.gzip_blocks, self.sizes = table.gzip_blocks, table.sizes
        self.listed = table.counts   # as in the index (counts below may shrink)
        self.counts = table.counts.copy()
        self.missing, self.damaged = table.missing, table.damaged
        # Index-level validation: a missing shard, and the samples past the end of a
        # truncated one, leave the order before the first batch. Every rank has the same
        # findings, so all agree on the batch count (a per-sample skip later could not move
        # positions without making the ranks disagree).
        self.lost = {"missing_shard": 0, "truncated": 0}
        intact = getattr(table, "intact", {})
        for i in self.missing:
            self.lost["missing_shard"] += int(self.counts[i])
            self.counts[i] = 0
        for i in self.damaged:
            n = intact[i] if i in intact else intact_samples(table, i, storage)
            self.lost["truncated"] += int(self.counts[i]) - n
            self.counts[i] = n
        self.num_samples = int(self.counts.sum())

    @classmethod
    def from_counts(cls, counts: list[int]) -> "Source":
        """A source over shards known only by their sample counts: the order never reads
        files, so this plans and measures orders (tests, benchmarks) without any."""
        n = len(counts)
        table = ShardTable("/nowhere", [f"s{i}.tar" for i in range(n)], counts, [0] * n,
                           ["0" * 64] * n, [0] * n, True, {})
        return cls({"shards": table}, Storage())

    def path(self, shard: int) -> str:
        return self.table.path(shard)

    def index(self, shard: int) -> str | None:
        return self.table.index(shard)

    def index_size(self, shard: int) -> int | None:
        return self.table.index_size(shard)

    def sha256(self, shard: int) -> str:
        """Shard ``shard``'s sha256 in the manifest (hex): names its content."""
        return self.table.sha256(shard)


def intact_samples(table: ShardTable, i: int, storage: Storage) -> int:
    """Samples of a shorter-than-listed shard ``i`` that lie wholly inside the file."""
    n, index = int(table.counts[i]), table.index(i)
    if index is None:
        return 0
    try:
        size = storage.size(table.path(i))
        raw = storage.read_bytes(index)
        entries = np.frombuffer(raw[128:len(raw) - (len(raw) - 128) % 8], dtype="<u8")
    except (OSError, ValueError):
        return 0
    if size >= int(table.sizes[i]) or len(entries) < n + 1:
        return n if len(entries) >= n + 1 else 0   # modified, not cut: read and see
    gb = int(table.gzip_blocks[i])
    if not gb:
        return int(np.searchsorted(entries[: n + 1], size, side="right")) - 1
    whole = int(np.searchsorted(entries[n + 1:], size, side="right")) - 1   # blocks wholly there
    return min(n, max(0, whole) * gb)


class Plan:
    """The segments of an epoch (or of the endless stream) for the loader's sources.

    Args:
        sources: the sources, in ``data.mix`` order.
        weights: their mix weights (None: one source).
        seed: the order's seed.
        block: ``data.block_size``.
        interleave: ``data.interleave_shards``.
        shuffle_buffer: ``data.shuffle_buffer``.
        infinite: epochs chained without end (always with several sources).
    """

    def __init__(self, sources: list[Source], weights: list[float] | None, seed: int,
                 block: int, interleave: int, shuffle_buffer: int, infinite: bool):
        self.sources, self.seed, self.block = sources, seed, block
        self.interleave, self.shuffle_buffer = interleave, shuffle_buffer
        self.infinite = infinite or len(sources) > 1
        self._orders: list[OrderedDict[int, EpochOrder]] = [OrderedDict() for _ in sources]
        self.pattern = None
        if len(sources) > 1:
            w = np.asarray(weights, dtype=np.float64)
            counts = np.floor(w / w.sum() * MIX_PERIOD).astype(np.int64)
            # largest remainders get the leftover slots, so the counts sum to the period
            rest = np.argsort(-(w / w.sum() * MIX_PERIOD - counts), kind="stable")
            counts[rest[: MIX_PERIOD - counts.sum()]] += 1
            self.pattern = rng(seed, 3).permutation(np.repeat(np.arange(len(sources)), counts))

    def order(self, source: int, epoch: int) -> EpochOrder:
        """The epoch order of ``source`` in ``epoch`` (cached)."""
        cache = self._orders[source]
        order = cache.get(epoch)
        if order is None:
            order = cache[epoch] = EpochOrder(self.sources[source].counts, self.seed + 7919 * source,
                                              epoch, self.block, self.interleave)
            if len(cache) > _ORDERS_KEPT:
                cache.popitem(last=False)
        return order

    def _segment(self, parts: list[tuple[Pieces, tuple[int, int]]], epoch: int, index: int,
                 world: int, batch: int) -> Segment:
        last = None if self.infinite else epoch
        sources = [SourceSegment(partial(self.order, k), src.num_samples, world, self.block,
                                 pieces, base, last)
                   for k, (src, (pieces, base)) in enumerate(zip(self.sources, parts))]
        window = window_size(batch, world, self.block, self.interleave, self.shuffle_buffer)
        return Segment(sources, self.pattern, self.seed, epoch, index, batch, window)

    def segment(self, epoch: int, history: list[list[int]], world: int,
                batch: int) -> tuple[Segment, int]:
        """The segment a loader of ``world`` ranks and ``batch`` reads now, and the slots
        each of its ranks has read of it, after the ``history`` ``[world, batch, consumed]``
        of this epoch (replayed: each change of world or batch size deals the rest anew)."""
        fresh = [(Pieces.empty(), (0 if self.infinite else epoch, 0))] * len(self.sources)
        if not history:
            return self._segment(fresh, epoch, 0, world, batch), 0
        w, b, consumed = history[0]
        seg = self._segment(fresh, epoch, 0, w, b)
        for i, (w, b, c) in enumerate(history[1:], 1):
            seg, consumed = self._segment(seg.successor(consumed), epoch, i, w, b), c
        if (world, batch) == (seg.world, seg.batch_size):
            return seg, consumed
        return self._segment(seg.successor(consumed), epoch, len(history), world, batch), 0


class _Worker:
    """Per-process reading state: storage, readers, bad-data counters, recent keys."""

    def __init__(self, stream: "RankStream"):
        self.stream = stream
        self.storage = Storage(stream.storage_options, stream.max_retries)
        cache = None
        if stream.cache_dir is not None:
            cache = NodeCache(stream.cache_dir, stream.cache_max_bytes)
        self.readers = [BlockReader(s, self.storage, cache) for s in stream.sources]
        self.errors: dict[str, int] = {}   # since the last batch (sent with it)
        self.logged: dict[str, int] = {}
        self.last: dict[str, str] = {}   # the latest message of each reason (to name a whole batch's cause)
        self.recent: OrderedDict[tuple, None] = OrderedDict()
        self.recent_limit = max(4 * stream.segment.window, 4096)
        self.bytes_used = 0

    def read(self, run: tuple[int, int, int, int]) -> list:
        """One run ``(source, shard, lo, hi)``: its samples' bytes (or errors)."""
        k, shard, lo, hi = run
        src = self.stream.sources[k]
        if shard in src.missing:
            return [SampleError("missing_shard", src.missing[shard])] * (hi - lo)
        try:
            return self.readers[k].read_run(shard, lo, hi)
        except DataError:   # a shard replaced under the loader: refused, never a bad sample
            raise
        except Exception as exc:   # noqa: BLE001 - one policy for every store's errors
            return [run_failure(exc, src.path(shard))] * (hi - lo)

    def bad(self, source: int, shard: int, reason: str, message: str, key: str | None):
        path = self.stream.sources[source].path(shard)
        where = f"sample {key!r}: " if key else ""
        self.errors[reason] = self.errors.get(reason, 0) + 1
        n = self.logged[reason] = self.logged.get(reason, 0) + 1   # since the worker started
        self.last[reason] = f"{where}{message}"
        if self.stream.on_error == "raise":
            raise DataError(f"{where}{message} (data.on_error=raise; 'skip' skips and counts)",
                            source=path)
        if n <= 3 or str(n).rstrip("0") == "1":  # 1, 2, 3, 10, 100, 1000...: rate-limited
            log.warning("skipping bad sample (%s, %d so far in this worker): %s: %s%s",
                        reason, n, path, where, message)

    def sample(self, source: int, epoch: int, shard: int, raw: Any) -> dict | None:
        """Decode one sample's bytes (or count its error); None when it is bad."""
        if isinstance(raw, SampleError):
            self.bad(source, shard, raw.reason, raw.message, raw.key)
            return None
        key = None
        try:
            key, members = split_members(raw)
            sample = decode_sample_bytes(members, key, self.stream.max_text_chars, self.stream.features_dim)
        except SampleError as exc:
            self.bad(source, shard, exc.reason, exc.message, exc.key or key)
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
        self.bytes_used += len(raw)
        return sample

    def counts(self) -> dict[str, int]:
        """Bad samples and I/O since the last call (then reset): errors by reason, plus
        ``io_requests``, ``io_bytes_read``, ``io_bytes_used``, ``io_metadata``."""
        io = self.storage.stats.take()
        out, self.errors = self.errors, {}
        if io["retries"]:
            out["retries"] = out.get("retries", 0) + io["retries"]
        out.update(io_requests=io["requests"], io_bytes_read=io["bytes_read"],
                   io_metadata=io["metadata"], io_bytes_used=self.bytes_used)
        self.bytes_used = 0
        return out

    def close(self) -> None:
        self.storage.close()


def _empty_batch_error(j: int, rank: int, state: _Worker) -> str:
    """Why batch ``j`` has no good sample, naming the fix: a config key when every sample
    failed the model's vector length (a wrong ``model.item_features_dim``, not damage)."""
    if set(state.errors) == {"bad_features"} and "model.item_features_dim" in state.last["bad_features"]:
        return (f"every sample of batch {j} on rank {rank} has a feature vector of another length than "
                f"model.item_features_dim, e.g. {state.last['bad_features']}: set model.item_features_dim "
                f"to the length of the shards' vectors")
    return (f"every sample of batch {j} on rank {rank} is bad (see the warnings above); re-shard the "
            f"damaged shards or raise data.shuffle_buffer")


def _runs(src: np.ndarray, shards: np.ndarray, samples: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The distinct samples as runs ``(source, shard, lo, hi)`` in file order: contiguous,
    or bridging small gaps (see below)."""
    if not len(samples):
        return []
    order = np.lexsort((samples, shards, src))
    k, s, i = src[order], shards[order], samples[order]
    keep = np.ones(len(i), dtype=bool)
    keep[1:] = (k[1:] != k[:-1]) | (s[1:] != s[:-1]) | (i[1:] != i[:-1])
    k, s, i = k[keep], s[keep], i[keep]
    starts = np.flatnonzero(np.concatenate([[True], (k[1:] != k[:-1]) | (s[1:] != s[:-1])
                                            | (i[1:] != i[:-1] + 1)]))
    ends = np.concatenate([starts[1:], [len(i)]])
    runs: list[list[int]] = []
    for a, b in zip(starts, ends):
        run = [int(k[a]), int(s[a]), int(i[a]), int(i[b - 1]) + 1, b - a]   # + samples used
        last = runs[-1] if runs else None
        # Bridge a small gap (samples of this shard not needed here: the dropped remainder
        # of an epoch's last window, the read part of a resumed block) rather than make
        # another request, while the samples fetched stay within 1.25x of those used.
        if last is not None and last[:2] == run[:2]:
            gaps = (last[3] - last[2] - last[4]) + (run[2] - last[3])
            if 4 * gaps <= last[4] + run[4]:
                last[3], last[4] = run[3], last[4] + run[4]
                continue
        runs.append(run)
    return [(k, s, lo, hi) for k, s, lo, hi, _ in runs]


class RankStream(IterableDataset):
    """The rest of one epoch (or of the endless stream) for one rank, as window items.

    Args:
        loader: the ``ClickPairLoader`` (its config, sources, rank, collate).
        segment: the segment being read.
        start: slots of the segment this rank has read.
        num_batches: batches left (None: endless).
    """

    def __init__(self, loader: Any, segment: Segment, start: int,
                 num_batches: int | None):
        cfg = loader.cfg
        self.sources, self.segment, self.rank = loader._sources, segment, loader.rank
        self.batch_size, self.start, self.num_batches = loader.batch_size, start, num_batches
        self.on_error, self.max_text_chars = cfg.on_error, cfg.max_text_chars
        self.features_dim = loader.features_dim
        self.storage_options, self.max_retries = cfg.storage_options, cfg.max_retries
        self.cache_dir, self.cache_max_bytes = cfg.cache_dir, cfg.cache_max_bytes
        self.io_threads, self.prefetch_blocks = cfg.io_threads, cfg.prefetch_blocks
        self.collate = loader.collate

    def windows(self) -> range:
        """Window numbers from the start to the last batch."""
        window = self.segment.window
        first = self.start // window
        if self.num_batches is None:
            return range(first, 1 << 62)
        if self.num_batches == 0:
            return range(first, first)
        return range(first, (self.start + self.num_batches * self.batch_size - 1) // window + 1)

    def plan(self, w: int) -> tuple[tuple, list]:
        """Window ``w``'s slots to read (from the start, up to the last batch), where they
        are, and the runs to fetch."""
        window = self.segment.window
        positions = self.segment.positions(self.rank, w)
        lo = max(self.start, w * window) - w * window
        hi = len(positions)
        if self.num_batches is not None:
            hi = min(hi, self.start + self.num_batches * self.batch_size - w * window)
        src, where = self.segment.locate(self.rank, positions[lo:hi])
        return (w * window + lo, src, where), _runs(src, where.shards, where.samples)

    def batches(self, worker: int, num_workers: int) -> Iterator[list[PairBatch] | dict]:
        """The window items of worker ``worker`` of ``num_workers`` (window ``i`` of
        ``windows()`` goes to worker ``i % num_workers``)."""
        state = _Worker(self)
        plans = (self.plan(w) for w in self.windows()[worker::num_workers])
        fetch = Prefetcher(plans, state.read, self.io_threads, self.prefetch_blocks)
        try:
            for where, runs, results in fetch:
                got = {}
                for (k, shard, lo, _), values in zip(runs, results):
                    if isinstance(values, BaseException):   # a bug, not bad data: re-raise
                        raise values
                    for i, value in enumerate(values):
                        got[(k, shard, lo + i)] = value
                yield self._item(state, where, got)
        except DataError as exc:
            yield {"__error__": str(exc)}
        finally:
            fetch.close()
            state.close()

    def _item(self, state: _Worker, where: tuple, got: dict) -> list[PairBatch] | dict:
        """One window's batches from its fetched samples."""
        first_slot, src, at = where
        out = []
        for a in range(0, len(src), self.batch_size):
            samples = []
            for j in range(a, min(a + self.batch_size, len(src))):
                k, shard = int(src[j]), int(at.shards[j])
                sample = state.sample(k, int(at.epochs[j]), shard, got[(k, shard, int(at.samples[j]))])
                if sample is not None:
                    samples.append(sample)
            j = (first_slot + a) // self.batch_size
            if not samples:
                # Only dense damage gets here (sparse bad samples just shorten a batch): an
                # empty batch would desynchronise DDP, so stop instead.
                return {"__error__": _empty_batch_error(j, self.rank, state)}
            batch = self.collate(samples)
            batch.counts.update(state.counts())
            out.append(batch)
        return out

    def __iter__(self) -> Iterator[list[PairBatch] | dict]:
        info = get_worker_info()
        if info is None:
            return self.batches(0, 1)
        torch.set_num_threads(1)   # one tokenising core per worker
        return self.batches(info.id, info.num_workers)
