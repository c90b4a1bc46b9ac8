"""Contrastive losses over (query, item) embedding pairs: in-batch NT-Xent / InfoNCE.

Row i of the query batch is paired with row i of the item batch; every other item of the
batch (and every hard negative) is a negative, except items that share the positive's id:
the same product clicked by two queries of one batch is not a negative for either.

Across devices (``cross_device=True`` under an initialised process group) the batch is the
global one: each local query is scored against the items and hard negatives of every rank,
gathered with :func:`clicktower.kernels.gather_with_grad`. The loss is the ONLY place that
scales for distributed gradients (see :class:`ContrastiveLoss`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clicktower.kernels import (all_reduce_sum, distributed_world, fused_contrastive_loss, gather_sizes,
                                gather_with_grad)
from clicktower.kernels.collectives import all_reduce_max

# Keys per tile of the column log-sum-exp (memory: block x local batch logits).
_COLUMN_BLOCK = 1024


@dataclass
class LossConfig:
    """Loss section of the experiment config.

    Args:
        symmetric: average the query->item and item->query losses.
        mask_duplicate_items: leave items that share the positive's id out of the
            denominator (needs item ids in the batch; the loader provides them).
        cross_device: when training on several processes, use the items (negatives) of all
            ranks, not only the local batch. Without it the negative pool is the local batch.
        gather_queries: symmetric + cross-device only: all-gather the queries for the
            item->query direction (true), or combine partial column log-sum-exps with
            all-reduces of N floats instead (false: the same loss and gradients, O(N) instead
            of O(N x D) communication; see :class:`ContrastiveLoss`).
    """

    symmetric: bool = True
    mask_duplicate_items: bool = True
    cross_device: bool = True
    gather_queries: bool = True


class ContrastiveLoss(nn.Module):
    """NT-Xent over the (global) batch, computed with the fused, tiled kernel.

    Per rank the loss is

        sum over local queries i of CE(s * q_i @ K.T, positive of i)  /  (G / W)

    where K are the items of every rank followed by every rank's hard negatives, G the
    global number of pairs and W the world size: the local mean when all ranks hold equal
    batches, and exact when they do not (the last batch of an epoch). The mean of this loss
    over ranks is the single-process mean loss over the global batch, and the gradient each
    rank gets for its local embeddings (through the gather's backward) is W times the
    gradient of that single-process loss; DDP's / DeepSpeed's averaging over W ranks then
    makes exactly the update of one process holding the whole global batch. With one
    process (or ``cross_device=False``) it is the plain in-batch mean.

    Args:
        symmetric: also compute item->query (each local item against every rank's
            queries) and return the mean of both directions.
        cross_device: gather keys from all ranks when a process group is initialised.
        gather_queries: how the symmetric item->query direction sees the other ranks'
            queries. True: all-gather them (N x D floats, with gradient). False: never move
            queries; each rank computes, for every gathered item, the log-sum-exp over its
            OWN queries (the same b x N scores as the query->item direction), and the ranks
            combine these partial column log-sum-exps with two all-reduces of N floats
            (max, then sum of exponentials; the backward is one more). Same value and
            gradients; communication O(N) instead of O(N x D).
        mask_duplicate_items: use the ids passed to ``forward`` to leave duplicates out of the
            denominators; False ignores every id (plain in-batch NT-Xent). The caller always
            passes the batch's ids: the loss alone decides what they mask.
    """

    def __init__(self, symmetric: bool = True, cross_device: bool = True, gather_queries: bool = True,
                 mask_duplicate_items: bool = True) -> None:
        super().__init__()
        self.symmetric = symmetric
        self.cross_device = cross_device
        self.gather_queries = gather_queries
        self.mask_duplicate_items = mask_duplicate_items

    @classmethod
    def from_config(cls, cfg: LossConfig, distributed: bool) -> "ContrastiveLoss":
        """The loss a ``LossConfig`` describes.

        Args:
            cfg: loss config.
            distributed: more than one process trains (cross-device gathering applies).
        """
        return cls(cfg.symmetric, cfg.cross_device and distributed, cfg.gather_queries, cfg.mask_duplicate_items)

    def forward(self, query_emb: torch.Tensor, item_emb: torch.Tensor, logit_scale: torch.Tensor,
                item_ids: torch.Tensor | None = None, query_ids: torch.Tensor | None = None,
                hard_negative_emb: torch.Tensor | None = None,
                hard_negative_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the loss.

        Args:
            query_emb: [B, D] local query embeddings.
            item_emb: [B, D] embeddings of each query's clicked item.
            logit_scale: 0-dim inverse temperature.
            item_ids: [B] int64 product ids; keys sharing a query's positive id are masked
                (-1 never matches).
            query_ids: [B] int64 query ids, masking the item->query direction the same way.
            hard_negative_emb: [H, D] extra negatives for every query (query->item only).
            hard_negative_ids: [H] int64 product ids of the hard negatives (-1 = unknown);
                a hard negative with the positive's id is masked. Default: never masked.

        Returns:
            The scalar loss (fp32).
        """
        if not self.mask_duplicate_items:
            item_ids = query_ids = hard_negative_ids = None
        rank, world = distributed_world() if self.cross_device else (0, 1)
        batch, device = query_emb.shape[0], query_emb.device
        sizes = gather_sizes(batch, device) if world > 1 else [batch]
        offset, global_batch = sum(sizes[:rank]), sum(sizes)
        # Rows of the gathered keys holding this rank's positives.
        targets = offset + torch.arange(batch, device=device)
        # Sum over local rows / (G / W): the one place distributed gradients are scaled.
        norm = global_batch / world

        keys = _gather(item_emb, sizes, world)
        key_ids = _gather(item_ids, sizes, world) if item_ids is not None else None
        if hard_negative_emb is not None:
            hn_sizes = gather_sizes(hard_negative_emb.shape[0], device) if world > 1 else None
            keys = torch.cat([keys, _gather(hard_negative_emb, hn_sizes, world)])
            if key_ids is not None:
                if hard_negative_ids is None:
                    hard_negative_ids = torch.full((hard_negative_emb.shape[0],), -1,
                                                   dtype=key_ids.dtype, device=device)
                key_ids = torch.cat([key_ids, _gather(hard_negative_ids, hn_sizes, world)])
        loss = fused_contrastive_loss(query_emb, keys, logit_scale, targets, key_ids,
                                      reduction="sum") / norm
        if not self.symmetric:
            return loss
        if world > 1 and not self.gather_queries:
            item_loss = _item_loss_from_column_lse(query_emb, item_emb, keys[:global_batch], logit_scale,
                                                   query_ids, sizes, offset, world) / norm
            return 0.5 * (loss + item_loss)
        # Item->query: each local item against every rank's queries, its own mask (query_ids).
        queries = _gather(query_emb, sizes, world)
        q_ids = _gather(query_ids, sizes, world) if query_ids is not None else None
        item_loss = fused_contrastive_loss(item_emb, queries, logit_scale, targets, q_ids,
                                           reduction="sum") / norm
        return 0.5 * (loss + item_loss)


def _gather(x: torch.Tensor, sizes: list[int] | None, world: int) -> torch.Tensor:
    return x if world == 1 else gather_with_grad(x, sizes=sizes)


def _item_loss_from_column_lse(query_emb: torch.Tensor, item_emb: torch.Tensor, items: torch.Tensor,
                               logit_scale: torch.Tensor, query_ids: torch.Tensor | None,
                               sizes: list[int], offset: int, world: int) -> torch.Tensor:
    """Sum over local items of the item->query cross-entropy against every rank's queries,
    without gathering queries: partial column log-sum-exps all-reduced (O(N) floats)."""
    batch, device, total = query_emb.shape[0], query_emb.device, sum(sizes)
    # Each gathered item's positive is the query of the same global row: local column
    # (row - offset) on the rank that holds it, absent (-1) elsewhere.
    rows = torch.arange(total, device=device)
    pos_col = torch.where((rows >= offset) & (rows < offset + batch), rows - offset, torch.full_like(rows, -1))
    pos_ids = _gather(query_ids, sizes, world) if query_ids is not None else None
    scale = logit_scale.reshape(())
    partial = _ColumnLSE.apply(items, query_emb, scale, pos_ids, query_ids, pos_col, _COLUMN_BLOCK)
    # log sum_r exp(partial_r) = M + log sum_r exp(partial_r - M), M the max over ranks
    # (no gradient: the shift cancels). A rank whose queries are all masked for an item
    # contributes exp(-inf) = 0; the positive's own rank always contributes.
    shift = all_reduce_max(partial)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    lse = shift + all_reduce_sum(torch.exp(partial - shift)).log()
    positive = (query_emb.to(lse.dtype) * item_emb.to(lse.dtype)).sum(1) * scale.to(lse.dtype)
    return (lse[offset:offset + batch] - positive).sum()


def _column_mask(pos_ids, query_ids, pos_col, c0: int, c1: int):
    """[c1 - c0, b] True where local query c shares the id of item j's positive query but is
    not that positive (-1 never matches); None without ids."""
    if pos_ids is None or query_ids is None:
        return None
    ids = pos_ids[c0:c1, None]
    own = pos_col[c0:c1, None] == torch.arange(query_ids.shape[0], device=query_ids.device)[None, :]
    return (ids == query_ids[None, :]) & (ids != -1) & ~own


class _ColumnLSE(torch.autograd.Function):
    """Per item: log-sum-exp over this rank's queries of ``scale * item @ queries.T``,
    masked; tiled over items and recomputed in backward, so memory stays O((N + b) * D +
    block * b). Differentiable in items, queries and scale."""

    @staticmethod
    def forward(ctx, items, queries, scale, pos_ids, query_ids, pos_col, block):
        cd = torch.float64 if items.dtype == torch.float64 else torch.float32
        n = items.shape[0]
        lse = torch.full((n,), float("-inf"), dtype=cd, device=items.device)
        with torch.no_grad():
            qf, s = queries.to(cd), scale.to(cd)
            if qf.shape[0]:
                for c0 in range(0, n, block):
                    c1 = min(n, c0 + block)
                    x = (items[c0:c1].to(cd) @ qf.T) * s
                    mask = _column_mask(pos_ids, query_ids, pos_col, c0, c1)
                    if mask is not None:
                        x.masked_fill_(mask, float("-inf"))
                    lse[c0:c1] = torch.logsumexp(x, dim=1)
        ctx.save_for_backward(items, queries, scale, pos_ids, query_ids, pos_col, lse)
        ctx.block = block
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        items, queries, scale, pos_ids, query_ids, pos_col, lse = ctx.saved_tensors
        cd, n = lse.dtype, items.shape[0]
        with torch.no_grad():
            qf, s, g = queries.to(cd), scale.to(cd), g.to(cd)
            # Items with every query masked have lse = -inf and no gradient.
            base = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
            d_items = torch.zeros(items.shape, dtype=cd, device=items.device)
            d_queries = torch.zeros(qf.shape, dtype=cd, device=qf.device)
            d_scale = torch.zeros((), dtype=cd, device=qf.device)
            if qf.shape[0]:
                for c0 in range(0, n, ctx.block):
                    c1 = min(n, c0 + ctx.block)
                    kb = items[c0:c1].to(cd)
                    dot = kb @ qf.T
                    x = dot * s - base[c0:c1, None]
                    mask = _column_mask(pos_ids, query_ids, pos_col, c0, c1)
                    if mask is not None:
                        x.masked_fill_(mask, float("-inf"))
                    # dlse_j/dlogit_jc = softmax over c; weighted by the incoming gradient.
                    w = x.exp_() * g[c0:c1, None]
                    d_items[c0:c1] = (w @ qf) * s
                    d_queries.addmm_(w.T, kb, alpha=float(s))
                    d_scale += (w * dot).sum()
        return (d_items.to(items.dtype), d_queries.to(queries.dtype), d_scale.to(scale.dtype).reshape(scale.shape),
                None, None, None, None)
