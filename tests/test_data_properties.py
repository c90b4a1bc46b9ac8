"""Property tests of the ClickPairLoader order: exactly once per epoch, equal batch counts,
resumes onto other world sizes and worker counts (worker split simulated in-process)."""
from __future__ import annotations

import json
from unittest import mock

import pytest

pytestmark = pytest.mark.unit
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clicktower.data.loader import ClickPairLoader, DataConfig, Rank, _EpochOrder, _Source
from clicktower.data.shards import ShardTable
from clicktower.data.shards import write_shards
from clicktower.data.sources import FieldMap

N = 257  # a prime: no batch size divides it
_DIRS: dict = {}


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory):
    """Shard folders of the same N pairs cut in different ways (1 to 40 shards, uneven)."""
    root = tmp_path_factory.mktemp("prop")
    src = root / "pairs.jsonl"
    with open(src, "w", encoding="utf-8") as fh:
        for i in range(N):
            fh.write(json.dumps({"query": f"q{i}", "item_id": i % 37,
                                 "item_text": "item " + "x" * (i % 50)}) + "\n")
    dirs = {}
    for shard_size, max_bytes in ((N, None), (100, None), (7, None), (64, 9000), (13, 4096)):
        out = root / f"s{shard_size}-{max_bytes}"
        write_shards([str(src)], str(out), FieldMap(), shard_size=shard_size,
                     max_shard_bytes=max_bytes)
        dirs[(shard_size, max_bytes)] = str(out)
    return dirs


def _run(loaders, num_batches=None):
    """Iterate the ranks' loaders in lockstep (as DDP does); keys per rank."""
    its = [iter(loader) for loader in loaders]
    per_rank = [[] for _ in loaders]
    step = 0
    while num_batches is None or step < num_batches:
        batches = []
        for it in its:
            batches.append(next(it, None))
        if all(b is None for b in batches):
            break
        assert all(b is not None for b in batches), "ranks yield different batch counts"
        for keys, batch in zip(per_rank, batches):
            keys.append(batch["keys"])
        step += 1
    return per_rank


def _round_robin(iterators):
    """DataLoader's order for an IterableDataset: worker 0, 1, ..., skipping finished ones."""
    live = list(iterators)
    while live:
        for it in list(live):
            try:
                yield next(it)
            except StopIteration:
                live.remove(it)


def _in_process_batches(loader, stream):
    """What ``ClickPairLoader._batches`` gets from DataLoader's workers, computed in this
    process: each worker's share of the stream, taken round-robin as DataLoader does."""
    workers = max(loader.cfg.num_workers, 1)
    return _round_robin([stream.batches(w, workers) for w in range(workers)])


def in_process_workers():
    """Run the loaders' worker split in this process, without spawning processes."""
    return mock.patch.object(ClickPairLoader, "_batches", _in_process_batches)


def _loaders(path, batch, world, workers, seed, buffer, block, state=None):
    out = []
    cfg = DataConfig(num_workers=workers, shuffle_buffer=buffer, block_size=block)
    for rank in range(world):
        loader = ClickPairLoader(cfg, path, batch, Rank(rank, world), seed)
        if state is not None:
            loader.load_state_dict(state)
        out.append(loader)
    return out


cut = st.sampled_from([(N, None), (100, None), (7, None), (64, 9000), (13, 4096)])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=cut, seed=st.integers(0, 3), buffer=st.sampled_from([1, 16, 100, 1000]),
       block=st.sampled_from([1, 5, 64]),
       first=st.tuples(st.integers(1, 4), st.integers(0, 3), st.integers(1, 40)),
       second=st.tuples(st.integers(1, 4), st.integers(0, 3), st.integers(1, 40)),
       stop_at=st.floats(0, 1))
def test_exactly_once_across_resumes(shard_dirs, cut, seed, buffer, block, first, second, stop_at):
    path = shard_dirs[cut]
    world1, workers1, batch1 = first
    world2, workers2, batch2 = second
    if N < world1 * batch1:
        batch1 = N // world1
    run1 = _loaders(path, batch1, world1, workers1, seed, buffer, block)
    steps1 = int(stop_at * run1[0].batches_per_epoch)
    with in_process_workers():
        keys1 = _run(run1, steps1)
    assert all(len(k) == steps1 for k in keys1)
    state = run1[0].state_dict()
    assert all(loader.state_dict() == state for loader in run1)  # no rank in the state
    assert "rank" not in state and "worker" not in state
    consumed = state["samples_consumed"]
    assert consumed == steps1 * world1 * batch1

    run2 = _loaders(path, batch2, world2, workers2, seed, buffer, block, state)
    with in_process_workers():
        keys2 = _run(run2)
    counts = {len(k) for k in keys2}
    assert len(counts) == 1  # every rank the same number of batches
    expected_rest = (N - consumed) // (world2 * batch2) * (world2 * batch2)
    flat = [k for rank in keys1 + keys2 for b in rank for k in b]
    assert len(flat) == len(set(flat))  # no sample twice within the epoch
    assert len(flat) == consumed + expected_rest  # every sample once but the remainder
    assert N - len(flat) < world2 * batch2
    assert all(loader.state_dict()["epoch"] == 1 for loader in run2)


def _counts_source(counts):
    """A _Source over shards that exist only as counts (the order never reads files)."""
    n = len(counts)
    table = ShardTable("/nowhere", [f"s{i}.tar" for i in range(n)], counts, [0] * n, ["0" * 64] * n,
                       [0] * n, True, {})
    return _Source({"shards": table})


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(0, 60), min_size=1, max_size=12), seed=st.integers(0, 9),
       window=st.integers(1, 80), block=st.integers(1, 20), epoch=st.integers(0, 3))
def test_epoch_order_is_a_permutation(counts, seed, window, block, epoch):
    if sum(counts) == 0:
        counts[0] = 1
    order = _EpochOrder(_counts_source(counts), seed, epoch, window, block)
    seen = [order.locate(t) for t in range(sum(counts))]
    assert sorted(seen) == sorted((s, i) for s, c in enumerate(counts) for i in range(c))
    again = _EpochOrder(_counts_source(counts), seed, epoch, window, block)
    assert [again.locate(t) for t in reversed(range(sum(counts)))] == seen[::-1]  # random access


def test_real_dataloader_workers_match_in_process_split(shard_dirs):
    path = shard_dirs[(7, None)]
    two_workers = DataConfig(num_workers=2, shuffle_buffer=50)
    real = [b["keys"] for b in ClickPairLoader(two_workers, path, 16, Rank(1, 2), 5)]
    sim = ClickPairLoader(two_workers, path, 16, Rank(1, 2), 5)
    with in_process_workers():
        assert real == [b["keys"] for b in sim]
    # and a real-worker resume onto one rank, another batch size
    loader = ClickPairLoader(DataConfig(num_workers=0, shuffle_buffer=50), path, 16, Rank(0, 1), 5)
    it = iter(loader)
    head = [k for _ in range(5) for k in next(it)["keys"]]
    resumed = ClickPairLoader(two_workers, path, 24, Rank(0, 1), 5)
    resumed.load_state_dict(loader.state_dict())
    tail = [k for b in resumed for k in b["keys"]]
    assert len(set(head + tail)) == len(head + tail) == 80 + (N - 80) // 24 * 24


def test_infinite_and_mixed(shard_dirs):
    a, b = shard_dirs[(7, None)], shard_dirs[(100, None)]
    endless = DataConfig(infinite=True, shuffle_buffer=30)
    loader = ClickPairLoader(endless, a, 50)
    it = iter(loader)
    keys = [k for _ in range(12) for k in next(it)["keys"]]  # 600 > 2 passes of 257
    assert len(set(keys[:N])) == N and set(keys[N:2 * N]) == set(keys[:N])
    state = loader.state_dict()
    assert state["samples_consumed"] == 600 and state["epoch"] == 0
    resumed = ClickPairLoader(endless, a, 25, Rank(1, 2))
    resumed.load_state_dict(state)
    first = ClickPairLoader(endless, a, 25, Rank(0, 2))
    first.load_state_dict(state)
    nxt = next(iter(first))["keys"] + next(iter(resumed))["keys"]
    cont = [k for _ in range(1) for k in next(it)["keys"]]
    assert nxt == cont  # same global stream on another world size

    mix = DataConfig(mix=[{"manifest": a, "weight": 0.7}, {"manifest": b, "weight": 0.3}])
    mixed = ClickPairLoader(mix, [a, b], 100, seed=3)
    it = iter(mixed)
    batches = [next(it) for _ in range(20)]
    assert mixed.state_dict()["samples_consumed"] == 2000
    # keys are row numbers in both sources: tell them apart by shard membership instead
    assert sum(len(b["keys"]) for b in batches) == 2000
    with pytest.raises(ValueError, match="mix weight"):
        ClickPairLoader(DataConfig(), [a, b], 10)


def test_mix_proportions_exact_per_period(shard_dirs):
    from clicktower.data.loader import MIX_PERIOD, _Plan

    a, b = _counts_source([50]), _counts_source([7])
    plan = _Plan([a, b], [0.7, 0.3], 0, 10, 4, True)
    picks = [plan.locate(0, p) for p in range(2 * MIX_PERIOD)]
    assert sum(1 for s, *_ in picks if s == 0) == 1400
    # each source is read in its own passes: the first 50 draws of source 0 are a permutation
    first_a = [(shard, i) for s, e, shard, i in picks if s == 0][:50]
    assert sorted(first_a) == [(0, i) for i in range(50)]
