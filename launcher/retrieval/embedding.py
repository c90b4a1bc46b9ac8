"""Embedding texts with a tower, alone or sharded over ranks.

Every flow that embeds a collection on several ranks (periodic evaluation, ``clicktower
embed``, ``clicktower mine``) uses ``rank_slice`` to split the rows and ``embed_sharded`` to
embed this rank's slice and gather everyone's, through ``clicktower.kernels.collectives``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from clicktower.data.features import FeatureTable
from clicktower.kernels import distributed_world, gather_with_grad
from clicktower.launcher.retrieval.defaults import EMBED_BATCH_SIZE
from clicktower.launcher.progress import bar
from clicktower.modeling.towers import Tower



@torch.no_grad()
def embed_texts(tower: Tower, tokenizer: Any, texts: Sequence[str], max_length: int,
                batch_size: int = EMBED_BATCH_SIZE, features: FeatureTable | None = None,
                progress: str | None = None) -> torch.Tensor:
    """Embed texts in batches, in eval mode; returns [len(texts), D] float32 on the CPU.

    Args:
        tower: the tower to use.
        tokenizer: its tokenizer.
        texts: the texts.
        max_length: token limit.
        batch_size: texts per forward pass.
        features: the items' feature vectors, row for row with ``texts``, for an item
            tower that fuses them (None: no vectors; such a tower uses its "missing"
            embedding for every row).
        progress: label of a progress bar on stderr (None: no bar).
    """
    was_training = tower.training
    tower.eval()
    device = next(tower.parameters()).device
    # Sorting by length keeps padding low; the original order is restored at the end.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), tower.embedding_dim)
    shown = bar(len(texts), progress or "", enabled=progress is not None, unit="text")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        extra = ()
        if features is not None and getattr(tower, "fusion", None) is not None:
            extra = (torch.from_numpy(features.values[idx]).to(device),
                     torch.from_numpy(features.present[idx]).to(device))
        emb = tower(enc["input_ids"].to(device), enc["attention_mask"].to(device), *extra)
        out[idx] = emb.float().cpu()
        shown.update(len(idx))
    shown.close()
    tower.train(was_training)
    return out


def rank_slice(num_rows: int, rank: int, world_size: int) -> slice:
    """The contiguous rows of ``rank``: sizes differ by at most one, all rows covered once.

    Args:
        num_rows: rows in the collection.
        rank: this rank.
        world_size: number of ranks.
    """
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def embed_slice(tower: Tower, tokenizer: Any, texts: Sequence[str], max_length: int, rank: int,
                world_size: int, batch_size: int = EMBED_BATCH_SIZE,
                features: FeatureTable | None = None, progress: str | None = None) -> torch.Tensor:
    """Embed this rank's ``rank_slice`` of ``texts`` (on the CPU, in row order).

    Every rank runs the same number of forward passes: the slice is padded with copies of
    its last row up to the longest slice and the copies are dropped afterwards. Under ZeRO-3
    each forward gathers the weights collectively, so a rank with one batch fewer would hang
    the others.

    Args:
        tower: the tower to use.
        tokenizer: its tokenizer.
        texts: the whole collection (every rank passes the same).
        max_length: token limit.
        rank: this rank.
        world_size: number of ranks.
        batch_size: texts per forward pass.
        features: the items' vectors, row for row with ``texts`` (the whole collection).
        progress: label of rank 0's progress bar (None: no bar).
    """
    part = rank_slice(len(texts), rank, world_size)
    rows = list(texts[part])
    longest = math.ceil(len(texts) / world_size)
    filler = rows[-1:] or list(texts[:1])
    padded = rows + filler * (longest - len(rows))
    if features is not None:
        # The same padding, row for row: the filler rows repeat the slice's last vector.
        index = list(range(len(texts)))[part]
        index = index + (index[-1:] or [0]) * (longest - len(index))
        features = features.take(index)
    label = None if progress is None or rank else progress + (f" (rank 0 of {world_size})" if world_size > 1 else "")
    return embed_texts(tower, tokenizer, padded, max_length, batch_size, features, label)[:len(rows)]


def embed_sharded(tower: Tower, tokenizer: Any, texts: Sequence[str], max_length: int,
                  device: torch.device, batch_size: int = EMBED_BATCH_SIZE,
                  features: FeatureTable | None = None, progress: str | None = None) -> torch.Tensor:
    """Embed ``texts`` split over every rank and return all rows, in order, on every rank.

    Each rank embeds its ``rank_slice`` (``embed_slice``); the slices are all-gathered with
    ``gather_with_grad`` (uneven sizes handled there). Without an initialised process group
    this embeds everything locally.

    Args:
        tower: the tower to use (the same weights on every rank).
        tokenizer: its tokenizer.
        texts: the whole collection (every rank passes the same).
        max_length: token limit.
        device: the collective's device (the backend's: CUDA for NCCL, CPU for gloo).
        batch_size: texts per forward pass.
        features: the items' vectors, row for row with ``texts`` (see ``embed_texts``).
        progress: label of rank 0's progress bar (None: no bar).

    Returns:
        [len(texts), D] float32 on the CPU.
    """
    rank, world = distributed_world()
    local = embed_slice(tower, tokenizer, texts, max_length, rank, world, batch_size, features, progress)
    if world == 1:
        return local
    return gather_with_grad(local.to(device)).cpu()
