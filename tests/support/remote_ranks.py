"""Rank functions for the object-storage tests (run by ``dist_harness.run_ranks``)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (what a launcher passes to ``ClickPairLoader``)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def read_half_epoch(rank: int, world: int, manifest: str, batch: int, cfg_kwargs: dict) -> dict:
    """Read the first half of an epoch from ``manifest`` (an ``s3://`` URL) on this gloo rank,
    a collective per step as DDP does; returns the keys, the loader state and the start-up
    metadata calls of this rank."""
    from clicktower.data.loader import ClickPairLoader, DataConfig, Rank

    loader = ClickPairLoader(DataConfig(**cfg_kwargs), manifest, batch, Rank(rank, world), seed=3,
                             broadcast_object=broadcast_object)
    startup = loader.io_counts()
    it = iter(loader)
    keys = []
    for _ in range(loader.batches_per_epoch // 2):
        keys += next(it).keys
        dist.all_reduce(torch.tensor([1]))
    return {"keys": keys, "state": loader.state_dict(), "startup": startup,
            "io": loader.io_counts(), "errors": loader.error_counts()}
