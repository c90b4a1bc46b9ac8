"""``PairLabels``: the per-sample labels of a batch of click pairs, everything the contrastive
loss reads besides the embeddings (ids, weights, exclusions, hard negatives, teacher scores).

The loader (``clicktower.data``) builds them and the loss (``clicktower.modeling``) reads them;
they live here, under both, so that neither imports the other. A new per-sample field goes
here, into the loader's ``collate`` and into the loss (docs/training.md, "Adding a per-sample
field").
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

__all__ = ["PairLabels"]


@dataclass
class PairLabels:
    """Per-sample labels of B pairs and H hard negatives: everything the loss reads besides
    the embeddings. Every field is optional (None: the batch does not carry it).

    Args:
        item_ids: [B] int64 product id of each pair's item (-1: unknown, never matches).
        query_ids: [B] int64 id of each pair's query text (-1: unknown).
        weights: [B] float sample weights (default 1 each).
        exclude_ids: [B, E] int64 item ids each pair must never be scored against, padded
            with -1.
        hard_negative_ids: [H] int64 product ids of the hard negatives. Set (possibly empty)
            exactly when the batch's item rows hold hard negatives after its items.
        hard_negative_owner: [H] int64 pair of each hard negative, non-decreasing.
        teacher_scores: [B, 1 + K] float teacher scores of each pair's positive and its first
            K hard negatives (NaN: none).
    """

    item_ids: torch.Tensor | None = None
    query_ids: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    exclude_ids: torch.Tensor | None = None
    hard_negative_ids: torch.Tensor | None = None
    hard_negative_owner: torch.Tensor | None = None
    teacher_scores: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "PairLabels":
        """These labels with every tensor on ``device``.

        Args:
            device: the target device.
        """
        return replace(self, **{f.name: _to(getattr(self, f.name), device) for f in fields(self)})


def _to(value, device: torch.device | str):
    return value.to(device) if torch.is_tensor(value) else value
