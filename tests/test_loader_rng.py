"""The loader leaves the training process's random streams alone, with or without workers.

Dropout draws from the global torch generator, whose state a checkpoint saves and a resume
restores. If starting a pass over the loader drew from it (PyTorch's ``DataLoader`` takes its
workers' base seed from the global generator unless given one), a run resumed mid-epoch would
make one draw the uninterrupted run made at the epoch start instead, and every dropout mask
after the resume would differ; a different ``data.num_workers`` would change training too.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from clicktower.data.loader import ClickPairLoader, DataConfig, Rank

pytestmark = pytest.mark.unit


def _states() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_pass_over_the_loader_draws_no_random_numbers(shard_dir, workers):
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    before = _states()
    loader = ClickPairLoader(DataConfig(num_workers=workers), str(shard_dir), 100, Rank(1, 2))
    keys = [batch.keys for _, batch in zip(range(3), loader)]  # a pass, left after 3 batches
    resumed = ClickPairLoader(DataConfig(num_workers=workers), str(shard_dir), 100, Rank(1, 2))
    resumed.load_state_dict({"epoch": 0, "samples_consumed": 3 * 200})
    keys.append(next(iter(resumed)).keys)  # a new pass from a resumed position
    after = _states()
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])
    # the same batches as without workers (the resumed pass continues where the first stopped)
    plain = ClickPairLoader(DataConfig(num_workers=0), str(shard_dir), 100, Rank(1, 2))
    assert keys == [batch.keys for _, batch in zip(range(4), plain)]
