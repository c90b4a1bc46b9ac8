"""Two real gloo ranks read one epoch: equal batch counts, disjoint keys, all but the remainder."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_harness import run_ranks

pytestmark = pytest.mark.multiprocess


def _read_epoch(rank: int, world: int, path: str) -> tuple[int, list]:
    from clicktower.data.loader import ClickPairLoader, DataConfig, Rank

    loader = ClickPairLoader(DataConfig(num_workers=0, shuffle_buffer=200), path, 24, Rank(rank, world), seed=4)
    keys, steps = [], 0
    for batch in loader:
        keys += batch.keys
        steps += 1
        flag = torch.tensor([1])
        dist.all_reduce(flag)  # a collective per step, as DDP does: a straggler would hang
    return steps, keys


def test_two_gloo_ranks(shard_dir):
    # run_ranks bounds the wait (a hung collective fails the test instead of hanging CI).
    (steps0, keys0), (steps1, keys1) = run_ranks(_read_epoch, 2, str(shard_dir))
    assert steps0 == steps1 == 2000 // 48
    assert not set(keys0) & set(keys1)
    assert len(set(keys0) | set(keys1)) == 2000 // 48 * 48
