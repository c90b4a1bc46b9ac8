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

from clicktower.kernels import distributed_world, fused_contrastive_loss, gather_sizes, gather_with_grad


@dataclass
class LossConfig:
    """Loss section of the experiment config.

    Args:
        symmetric: average the query->item and item->query losses.
        mask_duplicate_items: leave items that share the positive's id out of the
            denominator (needs item ids in the batch; the loader provides them).
        cross_device: when training on several processes, use the items (negatives) of all
            ranks, not only the local batch. Without it the negative pool is the local batch.
    """

    symmetric: bool = True
    mask_duplicate_items: bool = True
    cross_device: bool = True


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
    """

    def __init__(self, symmetric: bool = True, cross_device: bool = True) -> None:
        super().__init__()
        self.symmetric = symmetric
        self.cross_device = cross_device

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
        # Item->query: each local item against every rank's queries, its own mask (query_ids).
        queries = _gather(query_emb, sizes, world)
        q_ids = _gather(query_ids, sizes, world) if query_ids is not None else None
        item_loss = fused_contrastive_loss(item_emb, queries, logit_scale, targets, q_ids,
                                           reduction="sum") / norm
        return 0.5 * (loss + item_loss)


def _gather(x: torch.Tensor, sizes: list[int] | None, world: int) -> torch.Tensor:
    return x if world == 1 else gather_with_grad(x, sizes=sizes)
