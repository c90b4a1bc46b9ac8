"""Which logits leave the denominators of the fused contrastive kernels.

Entry (i, j) of the [B, N] logits is masked when j is not row i's positive and, for at least
one id kind, row i's id equals key j's id (id -1 never matches). A kind is a pair
``(row_ids, col_ids)``, each side one id per row/column or a padded LIST of ids (per-sample
exclusions). The rule is symmetric between pairs, so one mask serves both directions.

A second, score-based rule (:class:`ScoreCeiling`) leaves out key j >= ``first`` of row i
when the dot product ``q_i . k_j`` exceeds a per-row ceiling (the cross-batch memory's
false-negative filter); its tiles are recomputed from the raw operands, so the forward and the
backward leave out exactly the same entries.

Two representations, chosen once per call: sparse (the CPU's usual case: masked pairs found
up front by sorting ids, applied per tile with one ``index_fill_``) and dense (GPUs, or ids
that collide too often: each tile's mask recomputed from the ids, no host synchronisation).
Details: docs/fused-loss.md, "How the kernel works" (Masks).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

# Beyond this many masked entries per row and key the sparse list would cost more memory than
# the O((B + N) * D) the kernel promises (a popular item clicked by half the batch gives
# B^2 / 4 pairs): the dense per-tile comparison takes over.
_SPARSE_PAIRS_PER_ROW = 8

Kind = Tuple[torch.Tensor, torch.Tensor]
Blocks = Sequence[Tuple[int, int]]


def fill_(x: torch.Tensor, mask: Optional[torch.Tensor], value: float) -> torch.Tensor:
    """Set the masked entries of tile ``x`` to ``value`` in place.

    Args:
        x: a contiguous [rows, cols] tile.
        mask: what :meth:`PairMask.tile` returned: None (nothing masked), a bool tile, or the
            flat indices of the masked entries.
        value: the fill value (-inf before an exp, 0 after it).
    """
    if mask is None:
        return x
    if mask.dtype == torch.bool:
        return x.masked_fill_(mask, value)
    x.view(-1).index_fill_(0, mask, value)
    return x


class PairMask:
    """The masked entries of one kernel call's logits, tile by tile.

    Args:
        kinds: one ``(row_ids [B], col_ids [N])`` int64 pair per id kind (see the module doc).
        targets: [B] int64 column of each row's positive (never masked).
        rows: row blocks ``[(r0, r1), ...]`` of the tiling.
        cols: column blocks ``[(c0, c1), ...]`` of the tiling.
        host: the ids live where reading values is free (CPU): build the sparse list and
            report clean tiles. Otherwise dense tiles, every tile treated as masked.
    """

    def __init__(self, kinds: List[Kind], targets: torch.Tensor, rows: Blocks, cols: Blocks, host: bool) -> None:
        self.rows, self.cols, self.targets, self.host = list(rows), list(cols), targets, host
        # Dense form: both sides as [n, E] lists (one id: E = 1); -1 rows replaced by an id no
        # column has, so -1 never matches.
        self.kinds = [(_as_lists(_never_matching(r, c)), _as_lists(c)) for r, c in kinds]
        self.flat: Optional[torch.Tensor] = None
        self.bounds: Optional[List[int]] = None
        if host:
            self._build_sparse(kinds)

    def _build_sparse(self, kinds: List[Kind]) -> None:
        # List sides are flattened: one virtual row (column) per listed id, mapped back after.
        flat = [(_flatten(r), _flatten(c)) for r, c in kinds]
        counted = [_match_counts(r[0], c[0]) for r, c in flat]
        total = sum(int(counts.sum()) for _, _, counts in counted)
        n_rows, n_cols = self.targets.shape[0], kinds[0][1].shape[0]
        if total > _SPARSE_PAIRS_PER_ROW * (n_rows + n_cols):
            return  # dense tiles instead
        pairs = [_expand(*c) for c in counted]
        rows = torch.cat([_unflatten(r[1], p[0]) for (r, _), p in zip(flat, pairs)])
        cols = torch.cat([_unflatten(c[1], p[1]) for (_, c), p in zip(flat, pairs)])
        keep = cols != self.targets[rows]  # each row's own positive matches its own ids
        rows, cols = rows[keep], cols[keep]
        dev = rows.device
        r_start = torch.tensor([r0 for r0, _ in self.rows], dtype=torch.int64, device=dev)
        c_start = torch.tensor([c0 for c0, _ in self.cols], dtype=torch.int64, device=dev)
        c_width = torch.tensor([c1 - c0 for c0, c1 in self.cols], dtype=torch.int64, device=dev)
        ri = torch.searchsorted(r_start, rows, right=True) - 1
        ci = torch.searchsorted(c_start, cols, right=True) - 1
        tile = ri * len(self.cols) + ci
        order = torch.argsort(tile)
        flat = (rows - r_start[ri]) * c_width[ci] + (cols - c_start[ci])
        # A pair matched by both kinds appears twice: harmless, both write the same value.
        self.flat = flat[order]
        n_tiles = len(self.rows) * len(self.cols)
        self.bounds = torch.searchsorted(tile[order], torch.arange(n_tiles + 1, device=dev)).tolist()

    def tile(self, ri: int, ci: int) -> Optional[torch.Tensor]:
        """The mask of tile (row block ``ri``, column block ``ci``) for :func:`fill_`; None when
        the tile is known to hold no masked entry (only ever on the host).

        Args:
            ri: row block index.
            ci: column block index.
        """
        if self.bounds is not None:
            t = ri * len(self.cols) + ci
            lo, hi = self.bounds[t], self.bounds[t + 1]
            return self.flat[lo:hi] if hi > lo else None
        (r0, r1), (c0, c1) = self.rows[ri], self.cols[ci]
        eq = None
        for row_ids, col_ids in self.kinds:
            # One [rows, cols] comparison per pair of list positions (lists are short), never
            # a [rows, cols, E] tensor.
            for a in range(row_ids.shape[1]):
                for b in range(col_ids.shape[1]):
                    e = row_ids[r0:r1, a, None] == col_ids[None, c0:c1, b]
                    eq = e if eq is None else eq.logical_or_(e)
        if eq is None:  # only empty lists: nothing can match
            eq = torch.zeros(r1 - r0, c1 - c0, dtype=torch.bool, device=self.targets.device)
        _clear_positives(eq, self.targets[r0:r1], c0)
        if self.host and not bool(eq.any()):  # a CPU read: free
            return None
        return eq


class ScoreCeiling:
    """Entries (i, j), j >= ``first`` and j not row i's positive, whose dot product
    ``query[i] . keys[j]`` is above ``ceiling[i]``, tile by tile (bool tiles, or None where
    nothing is left out).

    The products are recomputed per tile from the raw (unscaled) operands in ``dtype``: the
    same inputs and operations in the forward and the backward pass, so both passes see the
    same mask bit for bit (a comparison against the shifted logits the passes compute would
    round differently near the ceiling).

    Args:
        query: [B, D] queries (detached).
        keys: [N, D] keys (detached).
        ceiling: [B] float ceilings (``inf``: row i keeps every key).
        first: the first key the rule applies to (keys before it are never left out).
        targets: [B] int64 column of each row's positive (never left out).
        dtype: the dtype the products are computed in (the kernel's compute dtype).
        host: the tiles live on the CPU (reading whether a tile is empty is free).
    """

    def __init__(self, query: torch.Tensor, keys: torch.Tensor, ceiling: torch.Tensor, first: int,
                 targets: torch.Tensor, dtype: torch.dtype, host: bool) -> None:
        self.query, self.keys, self.first = query.detach(), keys.detach(), int(first)
        self.ceiling, self.targets = ceiling.detach().to(dtype), targets
        self.dtype, self.host = dtype, host

    def tile(self, r0: int, r1: int, c0: int, c1: int) -> Optional[torch.Tensor]:
        """The bool mask of rows ``r0:r1`` x keys ``c0:c1``, or None (nothing left out).

        Args:
            r0, r1: the tile's rows.
            c0, c1: the tile's keys.
        """
        lo = max(c0, self.first)
        if lo >= c1:
            return None
        dots = torch.mm(self.query[r0:r1].to(self.dtype), self.keys[lo:c1].to(self.dtype).t())
        out = torch.zeros(r1 - r0, c1 - c0, dtype=torch.bool, device=dots.device)
        torch.gt(dots, self.ceiling[r0:r1, None], out=out[:, lo - c0:])
        _clear_positives(out, self.targets[r0:r1], c0)
        if self.host and not bool(out.any()):
            return None
        return out


def merge(score: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """One :func:`fill_` mask from a :class:`ScoreCeiling` tile and a :class:`PairMask` tile
    (either None).

    Args:
        score: a bool tile or None (updated in place: each call's tile is its own).
        mask: a bool tile, flat indices into the tile, or None.
    """
    if score is None:
        return mask
    if mask is None:
        return score
    if mask.dtype == torch.bool:
        return score.logical_or_(mask)
    # score is a fresh tile of ScoreCeiling.tile, owned by this call: filled in place.
    score.view(-1).index_fill_(0, mask, True)
    return score


def _never_matching(row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """Replace -1 rows by an id that no column has (so -1 never matches)."""
    sentinel = col_ids.min() - 1 if col_ids.numel() else row_ids.new_tensor(-2)
    return torch.where(row_ids == -1, sentinel, row_ids)


def _as_lists(ids: torch.Tensor) -> torch.Tensor:
    """[n] ids as [n, 1] lists; [n, E] lists as they are."""
    return ids[:, None] if ids.dim() == 1 else ids


def _flatten(ids: torch.Tensor):
    """``(flat ids, owner of each)``: a [n, E] list side as n * E virtual entries; a [n] side
    as itself (owner None)."""
    if ids.dim() == 1:
        return ids, None
    owner = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(ids.shape[1])
    return ids.reshape(-1), owner


def _unflatten(owner, index: torch.Tensor) -> torch.Tensor:
    return index if owner is None else owner[index]


def _clear_positives(eq: torch.Tensor, targets: torch.Tensor, c0: int) -> None:
    """Unmask each row's positive in a [rows, cols] tile starting at column ``c0``, without
    a host sync (no nonzero())."""
    n_cols = eq.shape[1]
    local = targets - c0
    inside = (local >= 0) & (local < n_cols)
    idx = local.clamp(0, max(n_cols - 1, 0))[:, None]
    if n_cols:
        eq.scatter_(1, idx, eq.gather(1, idx) & ~inside[:, None])


def _match_counts(row_ids: torch.Tensor, col_ids: torch.Tensor):
    """For each row, where its id's run starts in the sorted column ids and how long it is."""
    order = torch.argsort(col_ids)
    ranked = col_ids[order]
    lo = torch.searchsorted(ranked, row_ids)
    counts = torch.searchsorted(ranked, row_ids, right=True) - lo
    return order, lo, counts.masked_fill_(row_ids == -1, 0)


def _expand(order: torch.Tensor, lo: torch.Tensor, counts: torch.Tensor):
    """Every (row, column) with equal ids, from :func:`_match_counts`."""
    rows = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    within = torch.arange(rows.shape[0], device=rows.device) - first[rows]
    return rows, order[lo[rows] + within]
