"""Contrastive losses over (query, item) embedding pairs: in-batch NT-Xent / InfoNCE.

Row i of the query batch is paired with row i of the item batch; every other item of the
batch (and every hard negative) is a negative, except items that share the positive's id:
the same product clicked by two queries of one batch is not a negative for either.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LossConfig:
    """Loss section of the experiment config.

    Args:
        symmetric: average the query->item and item->query losses.
        mask_duplicate_items: leave items that share the positive's id out of the
            denominator (needs item ids in the batch; the loader provides them).
    """

    symmetric: bool = True
    mask_duplicate_items: bool = True


class ContrastiveLoss(nn.Module):
    """In-batch NT-Xent: mean over queries of ``-log softmax(scale * q @ k.T)[i, i]``.

    Args:
        symmetric: also compute item->query and return the mean of both directions.
    """

    def __init__(self, symmetric: bool = True) -> None:
        super().__init__()
        self.symmetric = symmetric

    def forward(self, query_emb: torch.Tensor, item_emb: torch.Tensor, logit_scale: torch.Tensor,
                item_ids: torch.Tensor | None = None, query_ids: torch.Tensor | None = None,
                hard_negative_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the loss.

        Args:
            query_emb: [B, D] query embeddings.
            item_emb: [B, D] embeddings of each query's clicked item.
            logit_scale: 0-dim inverse temperature.
            item_ids: [B] int64 product ids; keys sharing a query's positive id are masked
                (-1 never matches).
            query_ids: [B] int64 query ids, masking the item->query direction the same way.
            hard_negative_emb: [H, D] extra negatives for every query (query->item only).

        Returns:
            The scalar loss.
        """
        batch = query_emb.shape[0]
        keys = item_emb if hard_negative_emb is None else torch.cat([item_emb, hard_negative_emb])
        raw_logits = logit_scale * (query_emb.float() @ keys.float().T)
        targets = torch.arange(batch, device=query_emb.device)
        logits = raw_logits
        if item_ids is not None:
            key_ids = item_ids
            if hard_negative_emb is not None:
                # Hard negatives carry no id here, so they are never masked.
                pad = torch.full((hard_negative_emb.shape[0],), -1, dtype=item_ids.dtype,
                                 device=item_ids.device)
                key_ids = torch.cat([item_ids, pad])
            logits = logits.masked_fill(_duplicate_mask(item_ids, key_ids), float("-inf"))
        loss = F.cross_entropy(logits, targets)
        if not self.symmetric:
            return loss
        # Item->query uses its own mask (query_ids), not the query->item one.
        item_logits = raw_logits[:, :batch].T
        if query_ids is not None:
            item_logits = item_logits.masked_fill(_duplicate_mask(query_ids, query_ids), float("-inf"))
        return 0.5 * (loss + F.cross_entropy(item_logits, targets))


def _duplicate_mask(row_ids: torch.Tensor, key_ids: torch.Tensor) -> torch.Tensor:
    """[B, N] True where key j shares row i's positive id, other than the positive (j == i)."""
    same = (row_ids[:, None] == key_ids[None, :]) & (row_ids[:, None] != -1)
    same[torch.arange(row_ids.shape[0]), torch.arange(row_ids.shape[0])] = False
    return same
