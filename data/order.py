"""The sample order: which rank reads which samples, and in which order (counts and seed only).

Three layers, each a pure function of the seed, the shard sample counts and the config:
``EpochOrder`` (one source, one epoch: shards permuted, cut into blocks of ``block_size``
samples, blocks interleaved across ``interleave_shards`` shards), ``SourceSegment`` (one
source, one world size: the remaining samples as regions, dealt to the ranks block by block)
and ``Segment`` (all sources mixed in a fixed pattern of period ``MIX_PERIOD``, permuted inside
windows of whole batches). ``Segment.successor`` carries a partly read epoch over to another
world size or batch size so that every sample is still read at most once per epoch.

Why blocks, windows and the resume rules: docs/data.md ("Reading: order, exactly once,
resume").
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import numpy as np

MIX_PERIOD = 1000
_CACHED_ORDERS = 4     # epoch orders kept per source (a window may straddle two epochs)
_CACHED_CHUNKS = 64    # interleave chunks kept per epoch order


def rng(*words: int) -> np.random.Generator:
    """A numpy generator seeded by the 32-bit words ``words`` (order matters)."""
    return np.random.default_rng(np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in words]))


class EpochOrder:
    """Epoch position ``x`` in ``[0, N)`` -> ``(shard, sample)`` of one source in one epoch.

    Args:
        counts: samples per shard (the manifest's, less what left the order at start).
        seed: the source's seed.
        epoch: the epoch (or, when infinite, the pass over the source).
        block_size: samples per block.
        interleave: lanes (about one shard each) interleaved per chunk.
    """

    def __init__(self, counts: np.ndarray, seed: int, epoch: int, block_size: int, interleave: int):
        counts = np.asarray(counts, dtype=np.int64)
        self.seed, self.epoch, self.block_size = seed, epoch, block_size
        self.num_samples = int(counts.sum())
        self.perm = rng(seed, epoch, 0).permutation(len(counts))
        # an array, not a list: 8 bytes a shard (a Python int list costs ~36)
        self.starts = np.concatenate([[0], np.cumsum(counts[self.perm])])
        self.full_blocks = self.num_samples // block_size
        nonempty = max(1, int(np.count_nonzero(counts)))
        # A lane is about one shard's worth of blocks: reading a chunk column by column
        # takes one block from each of ``interleave`` consecutive shards in turn.
        self.lane = max(1, round(self.num_samples / nonempty / block_size))
        self.chunk = interleave * self.lane
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()

    def _chunk_order(self, c: int) -> np.ndarray:
        """Block offsets inside chunk ``c`` in reading order (column by column)."""
        order = self._chunks.get(c)
        if order is None:
            m = min(self.chunk, self.full_blocks - c * self.chunk)
            lanes, cols = np.divmod(np.arange(m), self.lane)
            g = rng(self.seed, self.epoch, 4, c)
            col_rank, lane_rank = g.permutation(self.lane), g.permutation(-(-m // self.lane))
            order = np.lexsort((lane_rank[lanes], col_rank[cols]))
            self._chunks[c] = order
            if len(self._chunks) > _CACHED_CHUNKS:
                self._chunks.popitem(last=False)
        return order

    def locate(self, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(shards, samples)`` at epoch positions ``xs`` (an int64 array)."""
        xs = np.asarray(xs, dtype=np.int64)
        units, within = np.divmod(xs, self.block_size)
        concat = xs.copy()   # position in the shard-permuted concatenation
        full = np.flatnonzero(units < self.full_blocks)
        if len(full):
            u = units[full]
            chunks = u // self.chunk
            block = np.empty_like(u)
            for c in np.unique(chunks):
                sel = chunks == c
                block[sel] = c * self.chunk + self._chunk_order(int(c))[u[sel] - c * self.chunk]
            concat[full] = block * self.block_size + within[full]
        slot = np.searchsorted(self.starts, concat, side="right") - 1
        return self.perm[slot], concat - self.starts[slot]


def share_len(length: int, world: int, block: int, rank: int) -> int:
    """Positions of a region of ``length`` that ``rank`` of ``world`` gets (stripes of
    ``block`` round-robin, the last partial round split evenly)."""
    full = length // (world * block)
    rest = length - full * world * block
    return full * block + rest // world + (rank < rest % world)


def share_to_region(ys: np.ndarray, length: int, world: int, block: int, rank: int) -> np.ndarray:
    """Region positions of ``rank``'s share positions ``ys`` (see ``share_len``)."""
    full = length // (world * block)
    rest = length - full * world * block
    tail_start = full * world * block + rank * (rest // world) + min(rank, rest % world)
    stripe, within = np.divmod(ys, block)
    return np.where(stripe < full, (stripe * world + rank) * block + within,
                    tail_start + (ys - full * block))


def _round_up(x: int, length: int, world: int, block: int) -> int:
    """The first stripe-round boundary of a region at or after region position ``x``
    (every rank's share of ``[0, boundary)`` is then whole blocks), or the region's end."""
    step = world * block
    full = length // step
    k = -(-x // step)
    return k * step if k <= full else length


class Pieces:
    """Explicit samples (leftovers of a resume): parallel int64 arrays, in reading order."""

    def __init__(self, epochs: np.ndarray, shards: np.ndarray, samples: np.ndarray):
        self.epochs, self.shards, self.samples = epochs, shards, samples

    @classmethod
    def empty(cls) -> "Pieces":
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z)

    @classmethod
    def concat(cls, parts: Sequence["Pieces"]) -> "Pieces":
        if not parts:
            return cls.empty()
        e, s, i = (np.concatenate([getattr(p, a) for p in parts]) for a in ("epochs", "shards", "samples"))
        # File order: the leftovers of a block come out as few contiguous ranges.
        keep = np.lexsort((i, s, e))
        return cls(e[keep], s[keep], i[keep])

    def __len__(self) -> int:
        return len(self.samples)


class SourceSegment:
    """One source's remaining samples for one world size, dealt to ranks (see module doc).

    Args:
        orders: ``epoch -> EpochOrder`` of the source (cached by the caller).
        num_samples: samples per epoch of the source.
        world: ranks.
        block: ``block_size``.
        pieces: explicit leftovers, read first.
        base: ``(epoch, offset)`` where the dealt-in-blocks part starts.
        last_epoch: the last epoch dealt (finite mode), or None (infinite).
    """

    def __init__(self, orders, num_samples: int, world: int, block: int, pieces: Pieces,
                 base: tuple[int, int], last_epoch: int | None):
        self.orders, self.n, self.world, self.block = orders, num_samples, world, block
        self.pieces, self.base, self.last_epoch = pieces, base, last_epoch
        e0, m0 = base
        self.first_len = 0 if last_epoch is not None and e0 > last_epoch else num_samples - m0

    def _lens(self, rank: int) -> tuple[int, int, int]:
        """Rank's share of the pieces, of the first epoch region, of a full epoch."""
        w, b = self.world, self.block
        return (share_len(len(self.pieces), w, b, rank), share_len(self.first_len, w, b, rank),
                share_len(self.n, w, b, rank))

    def total(self, rank: int) -> int | None:
        """Positions ``rank`` gets in all (None when infinite)."""
        if self.last_epoch is None:
            return None
        p, a, _ = self._lens(rank)
        return p + a

    def locate(self, rank: int, ys: np.ndarray) -> Pieces:
        """``(epochs, shards, samples)`` at share positions ``ys`` of ``rank``."""
        ys = np.asarray(ys, dtype=np.int64)
        p, a, f = self._lens(rank)
        epochs = np.empty_like(ys)
        shards = np.empty_like(ys)
        samples = np.empty_like(ys)
        sel = ys < p
        if sel.any():
            idx = share_to_region(ys[sel], len(self.pieces), self.world, self.block, rank)
            epochs[sel], shards[sel] = self.pieces.epochs[idx], self.pieces.shards[idx]
            samples[sel] = self.pieces.samples[idx]
        e0, m0 = self.base
        ep = np.full(len(ys), e0, dtype=np.int64)
        pos = np.zeros(len(ys), dtype=np.int64)
        first = (ys >= p) & (ys < p + a)
        pos[first] = m0 + share_to_region(ys[first] - p, self.first_len, self.world, self.block, rank)
        later = ys >= p + a
        if later.any():
            k, yy = np.divmod(ys[later] - p - a, f)
            ep[later] = e0 + 1 + k
            pos[later] = share_to_region(yy, self.n, self.world, self.block, rank)
        base = ~sel
        for e in np.unique(ep[base]):
            s = base & (ep == e)
            shards[s], samples[s] = self.orders(int(e)).locate(pos[s])
            epochs[s] = e
        return Pieces(epochs, shards, samples)

    def cut_after(self, draw: int) -> tuple[tuple[int, int], list[int]]:
        """The base position from which every rank's samples are at share positions >=
        ``draw`` and form whole rounds of blocks: ``((epoch, offset), share position of the
        cut for each rank)``."""
        best: tuple[int, int] | None = None
        for r in range(self.world):
            p, a, f = self._lens(r)
            if draw <= p:
                cut = self.base
            elif self.last_epoch is not None and draw >= p + a:   # finite: all of it read
                cut = (self.base[0], self.base[1] + self.first_len)
            elif draw <= p + a:
                x = int(share_to_region(np.array([draw - p - 1]), self.first_len, self.world,
                                        self.block, r)[0]) + 1
                cut = (self.base[0], self.base[1] + _round_up(x, self.first_len, self.world, self.block))
            else:
                k, yy = divmod(draw - p - a - 1, f)
                x = int(share_to_region(np.array([yy]), self.n, self.world, self.block, r)[0]) + 1
                cut = (self.base[0] + 1 + k, _round_up(x, self.n, self.world, self.block))
            best = cut if best is None or cut > best else best
        shares = [self._share_before(r, best) for r in range(self.world)]
        if best[1] == self.n:
            best = (best[0] + 1, 0)
        return best, shares

    def _share_before(self, rank: int, cut: tuple[int, int]) -> int:
        """``rank``'s share positions before base position ``cut`` (a round boundary)."""
        p, a, f = self._lens(rank)
        e0, m0 = self.base
        e, o = cut
        w, b = self.world, self.block
        if (e, o) <= (e0, m0):
            return p
        if e == e0:
            x = o - m0
            return p + (a if x >= self.first_len else x // (w * b) * b)
        x = o
        return p + a + (e - e0 - 1) * f + (f if x >= self.n else x // (w * b) * b)


class Segment:
    """All sources' remaining samples for one world size and batch size: each rank's mixed,
    window-permuted stream (see the module docstring).

    Args:
        sources: one ``SourceSegment`` per source.
        pattern: the mixing pattern (source of each slot of a period) or None (one source).
        seed: the order's seed.
        epoch: the loader epoch (0 when infinite).
        index: the segment's number in the epoch (seeds its windows).
        batch_size: positions per batch on a rank.
        window: positions permuted together (a multiple of ``batch_size``).
    """

    def __init__(self, sources: list[SourceSegment], pattern: np.ndarray | None, seed: int,
                 epoch: int, index: int, batch_size: int, window: int):
        self.sources, self.pattern = sources, pattern
        self.seed, self.epoch, self.index = seed, epoch, index
        self.batch_size, self.window = batch_size, window
        self.world = sources[0].world
        # Finite: the slots every rank reads (whole batches, the same count on every rank);
        # each rank's slots past them are its part of the epoch's dropped remainder, left
        # out of the windows so that they are the rank's last samples, not scattered ones.
        self.usable = None
        if pattern is None and sources[0].last_epoch is not None:
            self.usable = min(sources[0].total(r) for r in range(self.world)) // batch_size * batch_size
        if pattern is not None:
            onehot = np.zeros((MIX_PERIOD + 1, len(sources)), dtype=np.int64)
            onehot[np.arange(1, MIX_PERIOD + 1), pattern] = 1
            self.prefix = np.cumsum(onehot, axis=0)   # draws of each source before slot i
            self.per_period = self.prefix[MIX_PERIOD]

    def total(self, rank: int) -> int | None:
        """Positions of ``rank``'s stream (None when infinite)."""
        return self.sources[0].total(rank) if self.pattern is None else None

    def num_batches(self, consumed: int) -> int | None:
        """Batches every rank yields from ``consumed`` positions on (None when infinite)."""
        if self.usable is None:
            return None
        return max(0, self.usable - consumed) // self.batch_size

    def draws(self, q: int) -> list[int]:
        """Samples each source gave to a rank's first ``q`` positions."""
        if self.pattern is None:
            return [q]
        period, slot = divmod(q, MIX_PERIOD)
        return [int(period * self.per_period[k] + self.prefix[slot, k]) for k in range(len(self.sources))]

    def _window_perm(self, rank: int, w: int) -> np.ndarray:
        size = self.window
        if self.usable is not None:
            size = max(0, min(size, self.usable - w * self.window))
        return rng(self.seed, self.epoch, 6, self.index, rank, w).permutation(size)

    def positions(self, rank: int, w: int) -> np.ndarray:
        """Stream positions of window ``w`` of ``rank`` in batch order (window-permuted)."""
        return w * self.window + self._window_perm(rank, w)

    def locate(self, rank: int, qs: np.ndarray) -> tuple[np.ndarray, Pieces]:
        """``(sources, samples)`` at stream positions ``qs`` of ``rank``."""
        qs = np.asarray(qs, dtype=np.int64)
        if self.pattern is None:
            return np.zeros(len(qs), dtype=np.int64), self.sources[0].locate(rank, qs)
        period, slot = np.divmod(qs, MIX_PERIOD)
        src = self.pattern[slot]
        draws = period * self.per_period[src] + self.prefix[slot, src]
        out = Pieces(*(np.empty_like(qs) for _ in range(3)))
        for k in np.unique(src):
            sel = src == k
            got = self.sources[int(k)].locate(rank, draws[sel])
            out.epochs[sel], out.shards[sel], out.samples[sel] = got.epochs, got.shards, got.samples
        return src, out

    def successor(self, consumed: int) -> list[tuple[Pieces, tuple[int, int]]]:
        """Every source's ``(leftovers, base)`` once each rank has read ``consumed``
        positions: what the next segment (another world or batch size) deals out."""
        w = consumed // self.window
        start, end = w * self.window, (w + 1) * self.window
        if self.usable is not None:
            end = min(end, self.usable)
        first, cut_draw = self.draws(start), self.draws(end)
        cuts = [src.cut_after(d) for src, d in zip(self.sources, cut_draw)]
        leftovers: list[list[Pieces]] = [[] for _ in self.sources]
        for r in range(self.world):
            perm = self._window_perm(r, w)
            unread = np.sort(perm[consumed - start:]) + start
            src, got = self.locate(r, unread)
            for k, source in enumerate(self.sources):
                sel = src == k
                leftovers[k].append(Pieces(got.epochs[sel], got.shards[sel], got.samples[sel]))
                total = source.total(r)
                lo, hi = max(cut_draw[k], first[k]), cuts[k][1][r]
                if total is not None:
                    hi = min(hi, total)
                if hi > lo:   # not in the window, before the cut: dealt again one by one
                    leftovers[k].append(source.locate(r, np.arange(lo, hi)))
        return [(Pieces.concat(parts), cut[0]) for parts, cut in zip(leftovers, cuts)]


def window_size(batch_size: int, world: int, block: int, interleave: int, shuffle_buffer: int) -> int:
    """Positions permuted together on a rank: whole batches, at least ``shuffle_buffer``
    and at least ``ceil(interleave / world)`` blocks (so the ranks' windows together span
    about ``interleave`` blocks from as many shards)."""
    want = max(shuffle_buffer, math.ceil(interleave / world) * block)
    return max(1, math.ceil(want / batch_size)) * batch_size
