"""Property tests of the ClickPairLoader order: exactly once per epoch, equal batch counts,
resumes onto other world sizes, batch sizes and worker counts (worker split simulated
in-process), ranks reading whole blocks, global batches mixing shards."""
from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest

pytestmark = pytest.mark.unit
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clicktower.data.loader import ClickPairLoader, DataConfig, Rank
from clicktower.data.order import MIX_PERIOD, EpochOrder
from clicktower.data.shards import write_shards
from clicktower.data.sources import FieldMap
from clicktower.data.stream import Plan, Source

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
            keys.append(batch.keys)
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


def _loaders(path, batch, world, workers, seed, buffer, block, state=None, interleave=16):
    out = []
    cfg = DataConfig(num_workers=workers, shuffle_buffer=buffer, block_size=block,
                     interleave_shards=interleave)
    for rank in range(world):
        loader = ClickPairLoader(cfg, path, batch, Rank(rank, world), seed)
        if state is not None:
            loader.load_state_dict(state)
        out.append(loader)
    return out


cut = st.sampled_from([(N, None), (100, None), (7, None), (64, 9000), (13, 4096)])
layout = st.tuples(st.integers(1, 4), st.integers(0, 3), st.integers(1, 40))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=cut, seed=st.integers(0, 3), buffer=st.sampled_from([1, 16, 100, 1000]),
       block=st.sampled_from([1, 5, 64]), interleave=st.sampled_from([1, 3, 16]),
       layouts=st.lists(layout, min_size=2, max_size=3),
       stops=st.lists(st.floats(0, 1), min_size=2, max_size=2))
def test_exactly_once_across_resumes(shard_dirs, cut, seed, buffer, block, interleave, layouts,
                                     stops):
    """An epoch read under up to three layouts (world size, workers, batch size), stopped
    and resumed at random steps: no key twice, equal batch counts, and what is left at the
    end is less than a global batch plus two samples a rank."""
    path = shard_dirs[cut]
    state, flat = None, []
    for i, (world, workers, batch) in enumerate(layouts):
        batch = min(batch, N // world)
        loaders = _loaders(path, batch, world, workers, seed, buffer, block, state, interleave)
        last = i == len(layouts) - 1
        steps = None if last else int(stops[i] * loaders[0].remaining_batches())
        with in_process_workers():
            keys = _run(loaders, steps)
        assert len({len(k) for k in keys}) == 1   # every rank the same number of batches
        flat += [k for rank in keys for b in rank for k in b]
        if not last:
            state = loaders[0].state_dict()
            assert all(loader.state_dict() == state for loader in loaders)  # no rank in the state
            assert "rank" not in state and "worker" not in state
            assert state["samples_consumed"] == len(flat)
    assert len(flat) == len(set(flat))  # no sample twice within the epoch
    assert 0 <= N - len(flat) < world * (batch + 2)   # only the remainder is left out
    assert all(loader.state_dict()["epoch"] == 1 for loader in loaders)


def _counts_source(counts):
    """A Source over shards that exist only as counts (the order never reads files)."""
    return Source.from_counts(counts)


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(0, 60), min_size=1, max_size=12), seed=st.integers(0, 9),
       block=st.integers(1, 20), interleave=st.integers(1, 5), epoch=st.integers(0, 3))
def test_epoch_order_is_a_permutation(counts, seed, block, interleave, epoch):
    if sum(counts) == 0:
        counts[0] = 1
    n = sum(counts)
    order = EpochOrder(np.asarray(counts), seed, epoch, block, interleave)
    shards, samples = order.locate(np.arange(n))
    seen = list(zip(shards.tolist(), samples.tolist()))
    assert sorted(seen) == sorted((s, i) for s, c in enumerate(counts) for i in range(c))
    again = EpochOrder(np.asarray(counts), seed, epoch, block, interleave)
    back = again.locate(np.arange(n)[::-1])
    assert list(zip(back[0].tolist(), back[1].tolist())) == seen[::-1]  # random access
    # A block is a contiguous run of samples (of at most two shards when they are long).
    for u in range(n // block):
        s, i = shards[u * block:(u + 1) * block], samples[u * block:(u + 1) * block]
        assert all(i[j + 1] == i[j] + 1 for j in range(block - 1) if s[j + 1] == s[j])


def _read_all(plan, epoch, layouts, stops):
    """Every rank's (epoch, shard, sample) read under ``layouts`` [(world, batch)], each
    stopped after ``stops`` of its batches (the last: to the end); the pure order, no files."""
    history, read = [], []
    for i, (world, batch) in enumerate(layouts):
        seg, consumed = plan.segment(epoch, [list(h) for h in history], world, batch)
        left = seg.num_batches(consumed)
        steps = left if i == len(layouts) - 1 else int(stops[i] * left)
        for r in range(world):
            slots = np.arange(consumed, consumed + steps * batch)
            windows = slots // seg.window
            for w in np.unique(windows):
                pos = seg.positions(r, int(w))[slots[windows == w] - w * seg.window]
                got = seg.locate(r, pos)[1]
                read += list(zip(got.epochs.tolist(), got.shards.tolist(), got.samples.tolist()))
        if history and history[-1][:2] == [world, batch]:   # as the loader: go on reading
            history[-1][2] = consumed + steps * batch
        else:
            history.append([world, batch, consumed + steps * batch])
    return read, seg, consumed + steps * batch


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 300), min_size=1, max_size=30), seed=st.integers(0, 9),
       block=st.integers(1, 64), interleave=st.integers(1, 20), buffer=st.integers(1, 500),
       layouts=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 50)), min_size=1, max_size=4),
       stops=st.lists(st.floats(0, 1), min_size=4, max_size=4))
def test_order_exactly_once_through_layout_changes(counts, seed, block, interleave, buffer,
                                                   layouts, stops):
    """The pure order over many shard layouts: through up to three changes of world and
    batch size, every sample is read at most once and all but the end's remainder are."""
    n = sum(counts)
    layouts = [(w, min(b, max(1, n // w))) for w, b in layouts if n >= w]
    if not layouts:
        return
    plan = Plan([_counts_source(counts)], None, seed, block, interleave, buffer, False)
    read, seg, consumed = _read_all(plan, 0, layouts, stops)
    assert len(read) == len(set(read))
    world, batch = layouts[-1]
    totals = [seg.total(r) - consumed for r in range(world)]
    assert max(totals) - min(totals) <= 2          # ranks differ by at most one per region
    assert min(totals) < batch                      # no full batch left on some rank
    assert n - len(read) == sum(totals)             # the rest is exactly the remainder


@settings(max_examples=30, deadline=None)
@given(shards=st.integers(1, 40), size=st.integers(50, 400), block=st.sampled_from([16, 64]),
       world=st.integers(1, 8), seed=st.integers(0, 5))
def test_ranks_read_whole_blocks(shards, size, block, world, seed):
    """In a fresh epoch a rank's samples are runs of whole blocks: its requests are at most
    its blocks plus the shard ends they cross, and no rank reads another's samples."""
    counts = [size] * shards
    plan = Plan([_counts_source(counts)], None, seed, block, 16, 1, False)
    seg, _ = plan.segment(0, [], world, 1)
    owners = {}
    for r in range(world):
        total = seg.total(r)
        got = seg.sources[0].locate(r, np.arange(total))
        keys = sorted(zip(got.shards.tolist(), got.samples.tolist()))
        runs = 1 + sum(1 for a, b in zip(keys, keys[1:]) if a[0] != b[0] or b[1] != a[1] + 1)
        pieces = -(-total // block) + 1  # its blocks, and one piece of the evenly split last round
        # A piece no longer than a shard crosses at most one shard end; with shards shorter
        # than a block, a piece crosses up to one end per shard it touches.
        ends = pieces if size >= block else -(-total // size) + pieces
        assert runs <= pieces + min(shards, ends)
        for key in keys:
            assert owners.setdefault(key, r) == r


def test_global_batches_mix_many_shards():
    """The issue's example: 20 shards of 500 pairs, 2 ranks x 128, the defaults: on average
    at least half of min(20, interleave_shards=16) shards per global batch (before: ~3)."""
    cfg = DataConfig()
    plan = Plan([_counts_source([500] * 20)], None, 0, cfg.block_size, cfg.interleave_shards,
                cfg.shuffle_buffer, False)
    seg, _ = plan.segment(0, [], 2, 128)
    distinct = []
    for g in range(seg.num_batches(0)):
        shards = set()
        for r in range(2):
            slots = np.arange(g * 128, (g + 1) * 128)
            w = g * 128 // seg.window
            pos = seg.positions(r, w)[slots - w * seg.window]
            shards |= set(seg.locate(r, pos)[1].shards.tolist())
        distinct.append(len(shards))
    assert np.mean(distinct) >= 8, distinct


def test_real_dataloader_workers_match_in_process_split(shard_dirs):
    path = shard_dirs[(7, None)]
    two_workers = DataConfig(num_workers=2, shuffle_buffer=50, block_size=8)
    real = [b.keys for b in ClickPairLoader(two_workers, path, 16, Rank(1, 2), 5)]
    sim = ClickPairLoader(two_workers, path, 16, Rank(1, 2), 5)
    with in_process_workers():
        assert real == [b.keys for b in sim]
    # and a real-worker resume onto one rank, another batch size
    loader = ClickPairLoader(DataConfig(num_workers=0, shuffle_buffer=50, block_size=8), path, 16,
                             Rank(0, 1), 5)
    it = iter(loader)
    head = [k for _ in range(5) for k in next(it).keys]
    resumed = ClickPairLoader(two_workers, path, 24, Rank(0, 1), 5)
    resumed.load_state_dict(loader.state_dict())
    tail = [k for b in resumed for k in b.keys]
    assert len(set(head + tail)) == len(head + tail) > N - 24 - 2


def test_infinite_and_mixed(shard_dirs):
    a, b = shard_dirs[(7, None)], shard_dirs[(100, None)]
    endless = DataConfig(infinite=True, shuffle_buffer=30, block_size=8)
    loader = ClickPairLoader(endless, a, 50)
    it = iter(loader)
    keys = [k for _ in range(12) for k in next(it).keys]  # 600 > 2 passes of 257
    assert len(set(keys)) == N   # every sample is read...
    assert max(keys.count(k) for k in set(keys)) <= 3   # ...and none more than its passes
    state = loader.state_dict()
    assert state["samples_consumed"] == 600 and state["epoch"] == 0
    # On another world size the stream goes on from the same state on every rank: the
    # two ranks' next batches are disjoint and none of the first pass's samples repeats
    # before the pass ends.
    nxt = []
    for rank in range(2):
        resumed = ClickPairLoader(endless, a, 25, Rank(rank, 2))
        resumed.load_state_dict(state)
        nxt.append(next(iter(resumed)).keys)
    assert len(set(nxt[0]) | set(nxt[1])) == 50

    mix = DataConfig(mix=[{"manifest": a, "weight": 0.7}, {"manifest": b, "weight": 0.3}])
    mixed = ClickPairLoader(mix, [a, b], 100, seed=3)
    it = iter(mixed)
    batches = [next(it) for _ in range(20)]
    assert mixed.state_dict()["samples_consumed"] == 2000
    # keys are row numbers in both sources: tell them apart by shard membership instead
    assert sum(len(b.keys) for b in batches) == 2000
    with pytest.raises(ValueError, match="mix weight"):
        ClickPairLoader(DataConfig(), [a, b], 10)


def test_mix_proportions_exact_per_period():
    a, b = _counts_source([50]), _counts_source([7])
    plan = Plan([a, b], [0.7, 0.3], 0, 4, 16, 10, True)
    seg, _ = plan.segment(0, [], 1, 10)
    src, got = seg.locate(0, np.arange(2 * MIX_PERIOD))
    assert int((src == 0).sum()) == 1400
    # each source is read in its own passes: the first 50 draws of source 0 are a permutation
    first_a = sorted(zip(got.shards[src == 0][:50].tolist(), got.samples[src == 0][:50].tolist()))
    assert first_a == [(0, i) for i in range(50)]
    assert set(got.epochs[src == 0][:50].tolist()) == {0}
