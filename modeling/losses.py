"""Contrastive losses over (query, item) embedding pairs: in-batch NT-Xent / InfoNCE.

Row a of the query batch is paired with row a of the item batch; every other pair's item (and
every hard negative) is a negative for query a, and every other pair's query is a negative for
item a -- except false negatives. One rule for both directions: for an anchor pair a and a
candidate pair c != a, c leaves a's denominators when c has a's item id (the same product
clicked twice) or a's query id (the same query text clicked on another product); id -1 never
matches. Hard negatives carry item ids only and are masked for the anchors of the same item.

Across devices (``cross_device=True`` under an initialised process group) the batch is the
global one: each local query is scored against the items and hard negatives of every rank,
gathered with :func:`clicktower.kernels.gather_with_grad`. The loss is the ONLY place that
scales for distributed gradients (see :class:`ContrastiveLoss`). The tiled kernels live in
:mod:`clicktower.kernels`; this module only combines their outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clicktower.kernels import all_reduce_sum, distributed_world, gather_sizes, gather_with_grad
from clicktower.kernels import paired_logsumexp, positive_logits
from clicktower.kernels.collectives import all_reduce_max


@dataclass
class LossConfig:
    """Loss section of the experiment config.

    Args:
        symmetric: average the query->item and item->query losses.
        mask_duplicate_items: a pair (or hard negative) with the anchor's item id is not a
            negative, in both directions (needs item ids in the batch; the loader provides them).
        mask_duplicate_queries: a pair with the anchor's query id is not a negative, in both
            directions (query ids from the loader).
        cross_device: when training on several processes, use the items (negatives) of all
            ranks, not only the local batch. Without it the negative pool is the local batch.
        gather_queries: symmetric + cross-device only: all-gather the queries for a second
            item->query pass (true), or get both directions from ONE tiled pass, combining
            partial column log-sum-exps across ranks with all-reduces of N floats (false, the
            default: the same loss and gradients, O(N) instead of O(N x D) communication and
            half the loss FLOPs; see :class:`ContrastiveLoss`).
    """

    symmetric: bool = True
    mask_duplicate_items: bool = True
    mask_duplicate_queries: bool = True
    cross_device: bool = True
    gather_queries: bool = False


class ContrastiveLoss(nn.Module):
    """NT-Xent over the (global) batch, computed with the fused, tiled kernel.

    Per rank the loss is

        sum over local pairs a of w_a * CE_a  /  (sum of w over the global batch / W)

    where CE_a is pair a's cross-entropy (symmetric: the mean of its query->item and
    item->query ones) against every rank's items followed by every rank's hard negatives, w
    the sample weights (1 without ``weights``: the denominator is then G / W, G the global
    number of pairs) and W the world size. The mean of this loss over ranks is the
    single-process weighted mean loss over the global batch, exact also when ranks hold
    uneven batches (the last batch of an epoch), and the gradient each rank gets for its
    local embeddings (through the gather's backward) is W times the gradient of that
    single-process loss; DDP's / DeepSpeed's averaging over W ranks then makes exactly the
    update of one process holding the whole global batch. With one process (or
    ``cross_device=False``) it is the plain in-batch weighted mean.

    Args:
        symmetric: also compute item->query (each local item against every rank's queries)
            and return the mean of both directions.
        cross_device: gather keys from all ranks when a process group is initialised.
        gather_queries: how the item->query direction sees the other ranks' queries. False
            (default): never move queries; in the same tiled pass as the query->item
            direction each rank computes, for every gathered item, the log-sum-exp over its
            OWN queries, and the ranks combine these partial column log-sum-exps with two
            all-reduces of N floats (max, then sum of exponentials; the backward is one
            more). True: all-gather the queries (N x D floats, with gradient) and run a
            second one-direction pass. Same value and gradients.
        mask_duplicate_items: apply the item half of the false-negative rule (both
            directions, hard negatives included); False ignores item ids.
        mask_duplicate_queries: apply the query half of the rule (both directions); False
            ignores query ids. The caller always passes the batch's ids: the loss alone
            decides what they mask.
        block_size: tile side of the kernel; default ``clicktower.kernels.DEFAULT_BLOCK_SIZE``.
    """

    def __init__(self, symmetric: bool = True, cross_device: bool = True, gather_queries: bool = False,
                 mask_duplicate_items: bool = True, mask_duplicate_queries: bool = True,
                 block_size: int | None = None) -> None:
        super().__init__()
        self.symmetric = symmetric
        self.cross_device = cross_device
        self.gather_queries = gather_queries
        self.mask_duplicate_items = mask_duplicate_items
        self.mask_duplicate_queries = mask_duplicate_queries
        self.block_size = block_size

    @classmethod
    def from_config(cls, cfg: LossConfig, distributed: bool) -> "ContrastiveLoss":
        """The loss a ``LossConfig`` describes.

        Args:
            cfg: loss config.
            distributed: more than one process trains (cross-device gathering applies).
        """
        return cls(cfg.symmetric, cfg.cross_device and distributed, cfg.gather_queries, cfg.mask_duplicate_items,
                   cfg.mask_duplicate_queries)

    def forward(self, query_emb: torch.Tensor, item_emb: torch.Tensor, logit_scale: torch.Tensor,
                item_ids: torch.Tensor | None = None, query_ids: torch.Tensor | None = None,
                hard_negative_emb: torch.Tensor | None = None, hard_negative_ids: torch.Tensor | None = None,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the loss.

        Args:
            query_emb: [B, D] local query embeddings.
            item_emb: [B, D] embeddings of each query's clicked item.
            logit_scale: 0-dim inverse temperature.
            item_ids: [B] int64 product ids (-1 = unknown, never matches).
            query_ids: [B] int64 query ids (-1 = unknown, never matches).
            hard_negative_emb: [H, D] extra negatives for every query (query->item only).
            hard_negative_ids: [H] int64 product ids of the hard negatives (-1 = unknown);
                a hard negative with the anchor's item id is masked. Default: never masked.
            weights: [B] float sample weights (data, no gradient); default 1 each.

        Returns:
            The scalar loss (fp32).
        """
        if not self.mask_duplicate_items:
            item_ids = hard_negative_ids = None
        if not self.mask_duplicate_queries:
            query_ids = None
        rank, world = distributed_world() if self.cross_device else (0, 1)
        batch, device = query_emb.shape[0], query_emb.device
        if weights is not None:
            weights = weights.detach().to(device)
        sizes, total_weight = _sizes_and_total_weight(batch, weights, world, device)
        offset, total = sum(sizes[:rank]), sum(sizes)
        # Rows of the gathered keys holding this rank's positives.
        targets = offset + torch.arange(batch, device=device)
        keys, key_ids, key_query_ids = _negatives(item_emb, item_ids, query_ids, hard_negative_emb,
                                                  hard_negative_ids, sizes, world)
        # The item->query direction from the same tiles (one pass): column log-sum-exps over
        # this rank's queries for every gathered item; in one process they are complete.
        columns = total if self.symmetric and (world == 1 or not self.gather_queries) else 0
        lse, partial = paired_logsumexp(query_emb, keys, logit_scale, targets, key_ids, query_ids,
                                        key_query_ids, columns, self.block_size)
        positive = positive_logits(query_emb, item_emb, logit_scale)
        if weights is not None:
            weights = weights.to(lse.dtype)
        # Sum over local pairs / (sum of w over the global batch / W): the one place
        # distributed gradients are scaled.
        norm = (weights.sum() if total_weight is None else total_weight) / world
        loss = _weighted_sum(lse - positive, weights)
        if not self.symmetric:
            return loss / norm
        if columns:
            item_lse = partial if world == 1 else _combine_partials(partial)[offset:offset + batch]
        else:
            # gather_queries: each local item against every rank's queries, a second pass.
            # Rows are now items: row a's ids are still pair a's (item via targets, query
            # local), the keys' ids those of the gathered pairs -- the same rule.
            queries = _gather(query_emb, sizes, world)
            item_lse, _ = paired_logsumexp(
                item_emb, queries, logit_scale, targets, None if key_ids is None else key_ids[:total],
                query_ids, None if key_query_ids is None else key_query_ids[:total], 0, self.block_size)
        return 0.5 * (loss + _weighted_sum(item_lse - positive, weights)) / norm


def _gather(x: torch.Tensor, sizes: list[int] | None, world: int) -> torch.Tensor:
    return x if world == 1 else gather_with_grad(x, sizes=sizes)


def _weighted_sum(per_pair: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return per_pair.sum() if weights is None else (weights * per_pair).sum()


def _sizes_and_total_weight(batch: int, weights: torch.Tensor | None, world: int, device: torch.device):
    """Every rank's local batch size and the sum of w over the global batch (G without
    weights; None in one process with weights: the caller sums them in the loss's dtype).

    Across ranks both come from ONE all_gather of (size, local sum of w) per rank; a rank
    without weights counts 1 per pair (the loader's default weight), so ranks need not agree
    on whether their batch carries weights."""
    if world == 1:
        return [batch], (float(batch) if weights is None else None)
    local = torch.full((1, 2), float(batch), dtype=torch.float64, device=device)
    if weights is not None:
        local[0, 1] = weights.sum()
    rows = gather_with_grad(local, sizes=[1] * world).tolist()
    return [int(n) for n, _ in rows], sum(w for _, w in rows)


def _negatives(item_emb, item_ids, query_ids, hard_negative_emb, hard_negative_ids, sizes, world):
    """Keys (every rank's items, then every rank's hard negatives), their item ids and the
    query ids of the pairs they come from (-1 for hard negatives: they have no query)."""
    keys = _gather(item_emb, sizes, world)
    key_ids = _gather(item_ids, sizes, world) if item_ids is not None else None
    key_query_ids = _gather(query_ids, sizes, world) if query_ids is not None else None
    if hard_negative_emb is None:
        return keys, key_ids, key_query_ids
    device = item_emb.device
    hn_sizes = gather_sizes(hard_negative_emb.shape[0], device) if world > 1 else None
    keys = torch.cat([keys, _gather(hard_negative_emb, hn_sizes, world)])
    n_hard = keys.shape[0] - sum(sizes)
    if key_ids is not None:
        if hard_negative_ids is None:
            hard_negative_ids = torch.full((hard_negative_emb.shape[0],), -1, dtype=key_ids.dtype, device=device)
        key_ids = torch.cat([key_ids, _gather(hard_negative_ids, hn_sizes, world)])
    if key_query_ids is not None:
        key_query_ids = torch.cat([key_query_ids, key_query_ids.new_full((n_hard,), -1)])
    return keys, key_ids, key_query_ids


def _combine_partials(partial: torch.Tensor) -> torch.Tensor:
    """Column log-sum-exps over every rank's queries from each rank's partial ones:
    log sum_r exp(partial_r) = M + log sum_r exp(partial_r - M), M the max over ranks (no
    gradient: the shift cancels). A rank whose queries are all masked for an item contributes
    exp(-inf) = 0; the positive's own rank always contributes. The sum's backward is an
    all-reduce too, so each rank's partials get every rank's use of them."""
    shift = all_reduce_max(partial)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    return shift + all_reduce_sum(torch.exp(partial - shift)).log()
