"""Two real gloo ranks read one epoch: equal batch counts, disjoint keys, all but the remainder."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.multiprocess


def _rank_main(rank: int, world: int, port: int, path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from clicktower.data.loader import ClickPairLoader, DataConfig, Rank

        loader = ClickPairLoader(DataConfig(num_workers=0, shuffle_buffer=200), path, 24,
                                 Rank(rank, world), seed=4)
        keys, steps = [], 0
        for batch in loader:
            keys += batch["keys"]
            steps += 1
            flag = torch.tensor([1])
            dist.all_reduce(flag)  # a collective per step, as DDP does: a straggler would hang
        gathered = [None] * world
        dist.all_gather_object(gathered, (steps, keys))
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks(shard_dir, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "result.pt")
    mp.spawn(_rank_main, args=(2, port, str(shard_dir), out), nprocs=2, join=True)
    (steps0, keys0), (steps1, keys1) = torch.load(out)
    assert steps0 == steps1 == 2000 // 48
    assert not set(keys0) & set(keys1)
    assert len(set(keys0) | set(keys1)) == 2000 // 48 * 48
