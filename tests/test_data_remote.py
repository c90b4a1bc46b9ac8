"""Shards on object storage and HTTP, read through real servers on 127.0.0.1 (moto's S3 server,
Python's http.server; see tests/support/store_servers.py): the same epoch as from local disk,
whole-block reads, retried and counted transient errors, deleted objects, missing buckets,
writing with the manifest last, appending, exactly-once across gloo ranks and resumes."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from clicktower.data.errors import DataError
from clicktower.data.loader import ClickPairLoader, DataConfig, Rank
from clicktower.data.shards import load_manifest, write_shards
from clicktower.data.sources import FieldMap
from clicktower.data.storage import Storage
from conftest import TINY_CONFIG, clicktower
from store_servers import S3_ENV, http_server, make_bucket, moto_s3

pytest.importorskip("s3fs")
pytest.importorskip("moto")

# Small blocks and windows: an epoch of the 2,000 test pairs spans many windows and requests.
SMALL = {"block_size": 64, "shuffle_buffer": 64, "interleave_shards": 4, "num_workers": 0}


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server for this module, with the standard AWS settings pointing at it."""
    with pytest.MonkeyPatch.context() as mp, moto_s3() as (endpoint, faults):
        for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(key, value)
        make_bucket(endpoint, "clicks")
        yield SimpleNamespace(endpoint=endpoint, faults=faults)


@pytest.fixture(scope="module")
def s3_set(s3, synth_dir):
    """The conftest's shard set (2,000 pairs, shards of 300) written straight to S3."""
    url = "s3://clicks/v1"
    write_shards([str(synth_dir / "train.jsonl")], url, FieldMap(), shard_size=300)
    return url


def _epoch(manifest, world, batch, **cfg):
    """Every rank's keys of one epoch, and the loaders."""
    loaders = [ClickPairLoader(DataConfig(**{**SMALL, **cfg}), manifest, batch, Rank(r, world), 3)
               for r in range(world)]
    return [[k for b in loader for k in b.keys] for loader in loaders], loaders


@pytest.mark.unit
def test_s3_and_http_epochs_equal_local_with_whole_block_reads(s3_set, shard_dir):
    """From S3 and over HTTP an epoch is the same as from disk (same shards, same order),
    and a rank fetches about the bytes it uses (whole blocks, one request each)."""
    local, _ = _epoch(str(shard_dir), 2, 32)
    remote, loaders = _epoch(f"{s3_set}/manifest.json", 2, 32)
    assert remote == local and len(set(local[0]) | set(local[1])) == 2000 // 64 * 64
    for loader in loaders:
        io = loader.io_counts()
        assert io["io_bytes_read"] <= 1.5 * io["io_bytes_used"], io
        # blocks of 64 samples: about one request per block, plus index chunks and shard ends
        assert io["io_requests"] <= 2 * 1000 / 64 + 20, io
    with http_server(str(shard_dir)) as (url, _):
        over_http, _ = _epoch(f"{url}/manifest.json", 2, 32)
    assert over_http == local


@pytest.mark.unit
@pytest.mark.parametrize("store", ["s3", "http"])
def test_503_twice_is_retried_and_counted(s3, s3_set, shard_dir, store):
    local, _ = _epoch(str(shard_dir), 1, 50)
    if store == "s3":
        s3.faults.fail("/clicks/v1/shard-000002.tar", 2)
        got, (loader,) = _epoch(s3_set, 1, 50)
        log = s3.faults.log
    else:
        with http_server(str(shard_dir)) as (url, faults):
            faults.fail("/shard-000002.tar", 2)
            got, (loader,) = _epoch(url, 1, 50)
            log = faults.log
    assert got == local   # nothing lost
    assert loader.error_counts()["retries"] == 2
    assert sum(1 for _, path, status in log if status == 503 and "shard-000002.tar" in path) == 2


@pytest.mark.unit
def test_persistent_failure_follows_on_error(shard_dir, caplog):
    with http_server(str(shard_dir)) as (url, faults):
        faults.fail("/shard-000001.tar", 10_000)
        with caplog.at_level(logging.WARNING, logger="clicktower.data"):
            got, (loader,) = _epoch(url, 1, 50, max_retries=1)
        failed = loader.error_counts()["io_error"]   # shard 1's samples this epoch has
        assert loader.error_counts()["retries"] > 0 and 250 <= failed <= 300
        assert len(got[0]) == len(set(got[0])) == 2000 - failed   # 40 batches of 50
        assert f"{url}/shard-000001.tar" in caplog.text and "503" in caplog.text
        with pytest.raises(DataError, match=f"{url}/shard-000001.tar.*503"):
            _epoch(url, 1, 50, max_retries=0, on_error="raise")


@pytest.mark.unit
@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_object_deleted_mid_epoch(s3, synth_dir, on_error, caplog):
    url = f"s3://clicks/deleted-{on_error}"
    write_shards([str(synth_dir / "train.jsonl")], url, FieldMap(), shard_size=300)
    cfg = DataConfig(**{**SMALL, "prefetch_blocks": 1, "io_threads": 1, "on_error": on_error})
    loader = ClickPairLoader(cfg, url, 32, Rank(0, 1), 3)
    it = iter(loader)
    keys = next(it).keys
    Storage().remove(f"{url}/shard-000004.tar")   # gone after the loader started
    if on_error == "raise":
        with pytest.raises(DataError, match=f"{url}/shard-000004.tar"):
            for batch in it:
                pass
        return
    with caplog.at_level(logging.WARNING, logger="clicktower.data"):
        keys += [k for batch in it for k in batch.keys]
    lost = loader.error_counts()["missing_shard"]
    assert 0 < lost <= 300 and len(keys) == len(set(keys)) == 2000 // 32 * 32 - lost
    assert f"{url}/shard-000004.tar" in caplog.text


@pytest.mark.unit
def test_shard_to_s3_manifest_last_then_append(s3, synth_dir, tmp_path):
    lines = (synth_dir / "train.jsonl").read_text("utf-8").splitlines(keepends=True)
    (tmp_path / "day1.jsonl").write_text("".join(lines[:1200]), "utf-8")
    (tmp_path / "day2.jsonl").write_text("".join(lines[1200:]), "utf-8")
    url = "s3://clicks/daily"
    Storage().put_file(str(tmp_path / "day1.jsonl"), "s3://clicks/logs/day1.jsonl")
    first = len(s3.faults.log)
    # the click log itself on S3 too (an input URL is downloaded, then read as a file)
    write_shards(["s3://clicks/logs/day1.jsonl"], url, FieldMap(), shard_size=500)
    puts = [path for method, path, _ in s3.faults.log[first:] if method == "PUT"]
    assert puts[-1] == "/clicks/daily/manifest.json" and len(puts) == 7   # 3 shards, 3 indexes
    before = Storage().read_bytes(f"{url}/shard-000000.tar")
    old = ClickPairLoader(DataConfig(**SMALL), url, 100, Rank(0, 1), 3)
    it = iter(old)
    next(it)
    state = old.state_dict()

    mark = len(s3.faults.log)
    grown = write_shards([str(tmp_path / "day2.jsonl")], url, FieldMap(), shard_size=500, append=True)
    puts = [path for method, path, _ in s3.faults.log[mark:] if method == "PUT"]
    assert puts[-1] == "/clicks/daily/manifest.json" and len(puts) == 5   # 2 new shards + indexes
    assert [s["path"] for s in grown["shards"]][3:] == ["shard-000003.tar", "shard-000004.tar"]
    assert Storage().read_bytes(f"{url}/shard-000000.tar") == before   # not rewritten
    manifest = load_manifest(url)
    assert manifest["num_samples"] == 2000 and len(manifest["sources"]) == 2
    assert manifest["sources"][0] == "s3://clicks/logs/day1.jsonl"
    keys = [k for b in ClickPairLoader(DataConfig(**SMALL), url, 100, Rank(0, 1), 3) for k in b.keys]
    assert len(keys) == len(set(keys)) == 2000   # the appended keys do not collide
    resumed = ClickPairLoader(DataConfig(**SMALL), url, 100, Rank(0, 1), 3)
    resumed.load_state_dict(state)   # the set grew: a new epoch on the grown set
    assert (resumed.epoch, resumed.samples_consumed) == (state["epoch"] + 1, 0)


@pytest.mark.unit
def test_node_cache_serves_later_epochs_within_its_size(s3_set, tmp_path):
    from clicktower.data.blockio import CACHE_CHUNK

    cache = tmp_path / "cache"
    cfg = DataConfig(**SMALL, cache_dir=str(cache), cache_max_bytes=64 * 2**20)
    loader = ClickPairLoader(cfg, s3_set, 50, Rank(0, 1), 3)
    first = [k for b in loader for k in b.keys]
    fetched = loader.io_counts()["io_requests"]
    second = [k for b in loader for k in b.keys]
    assert sorted(first) == sorted(second) and first != second   # a new epoch order...
    assert loader.io_counts()["io_requests"] == fetched           # ...served from the cache
    small = 1536 * 1024   # smaller than the shard set: least recently used chunks go
    cfg = DataConfig(**SMALL, cache_dir=str(tmp_path / "small"), cache_max_bytes=small)
    keys = [k for b in ClickPairLoader(cfg, s3_set, 50, Rank(0, 1), 3) for k in b.keys]
    assert keys == first
    size = sum(f.stat().st_size for f in (tmp_path / "small").iterdir())
    assert 0 < size <= small * 1.1 + CACHE_CHUNK


@pytest.mark.unit
def test_missing_extra_is_one_line():
    pytest.importorskip("s3fs")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed: nothing is missing")
    with pytest.raises(DataError) as exc:
        load_manifest("gs://bucket/clicks/manifest.json")
    assert "\n" not in str(exc.value) and "pip install 'clicktower[gcs]'" in str(exc.value)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_gloo_ranks_from_s3_then_resume_on_one(s3_set):
    """Exactly once across 2 gloo ranks reading an s3:// manifest, the shard check done by
    rank 0 only, then a resume of that state on one rank with a loader worker process."""
    from dist_harness import run_ranks
    from remote_ranks import read_half_epoch

    manifest = f"{s3_set}/manifest.json"
    ranks = run_ranks(read_half_epoch, 2, manifest, 24, SMALL)
    assert ranks[0]["state"] == ranks[1]["state"]
    assert ranks[0]["startup"]["io_metadata"] > 0 and ranks[1]["startup"]["io_metadata"] == 0
    assert ranks[1]["startup"]["io_requests"] == 1   # rank 1 read the manifest, nothing else
    head = ranks[0]["keys"] + ranks[1]["keys"]
    assert len(head) == len(set(head)) == ranks[0]["state"]["samples_consumed"]
    resumed = ClickPairLoader(DataConfig(**{**SMALL, "num_workers": 1}), manifest, 40, Rank(0, 1), 3)
    resumed.load_state_dict(ranks[0]["state"])
    tail = [k for b in resumed for k in b.keys]
    assert len(head + tail) == len(set(head + tail)) > 2000 - 40 - 2


@pytest.mark.e2e
@pytest.mark.slow
def test_cli_missing_bucket_or_manifest_and_append(s3, synth_dir, tmp_path):
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3.endpoint}
    for manifest in ("s3://no-such-bucket/clicks/manifest.json", "s3://clicks/nothing-here"):
        result = clicktower("train", "--config", str(TINY_CONFIG), f"data.train_manifest={manifest}",
                            f"train.output_dir={tmp_path / 'run'}", env=env, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and lines[0].startswith("clicktower: error: data.train_manifest: s3://") and \
            "no such file" in lines[0], lines
    src = str(synth_dir / "train.jsonl")
    for extra in ([], ["--append", "--force"]):  # the same file twice: forced
        result = clicktower("shard", src, "--out", "s3://clicks/cli", "--shard-size", "700", *extra,
                            env=env, timeout=300)
        assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["num_samples"] == 4000 and summary["shards"] == 6


@pytest.mark.unit
def test_node_cache_never_serves_a_rewritten_shard_set(s3, synth_dir, tmp_path):
    """Issue 26: shards rewritten in place at the same s3:// prefix (new content, new manifest):
    the next loader on the same node cache reads the new samples, not the cached bytes (the
    cache was keyed by URL and chunk: 296 of 300 queries came from the old data)."""
    url = "s3://clicks/rewritten"
    lines = (synth_dir / "train.jsonl").read_text("utf-8").splitlines(keepends=True)[:300]
    (tmp_path / "clicks.jsonl").write_text("".join(lines), "utf-8")
    write_shards([str(tmp_path / "clicks.jsonl")], url, FieldMap(), shard_size=100)
    cfg = DataConfig(**SMALL, cache_dir=str(tmp_path / "cache"))
    old = [q for b in ClickPairLoader(cfg, url, 50, Rank(0, 1), 3) for q in b.queries]
    (tmp_path / "clicks.jsonl").write_text("".join(lines).replace('"query": "', '"query": "new '), "utf-8")
    write_shards([str(tmp_path / "clicks.jsonl")], url, FieldMap(), shard_size=100, overwrite=True)
    new = [q for b in ClickPairLoader(cfg, url, 50, Rank(0, 1), 3) for q in b.queries]
    assert len(old) == len(new) == 300 and not any(q.startswith("new ") for q in old)
    assert all(q.startswith("new ") for q in new)


@pytest.mark.unit
@pytest.mark.parametrize("cached", [False, True], ids=["direct", "node_cache"])
def test_objects_replaced_mid_epoch_are_refused_not_mixed(s3, synth_dir, tmp_path, cached):
    """The same manifest, every shard object replaced by one of the same size after the first
    batch (new ETags): one line naming the object, and no sample of the new content read."""
    from test_data_content import mark_queries

    url = f"s3://clicks/replaced-{'cached' if cached else 'direct'}"
    write_shards([str(synth_dir / "train.jsonl")], url, FieldMap(), shard_size=300)
    cfg = DataConfig(**{**SMALL, "prefetch_blocks": 1, "io_threads": 1},
                     cache_dir=str(tmp_path / "cache") if cached else None)
    it = iter(ClickPairLoader(cfg, url, 32, Rank(0, 1), 3))
    queries = list(next(it).queries)
    storage = Storage()
    for shard in range(7):
        path = f"{url}/shard-{shard:06d}.tar"
        storage.write_bytes(path, mark_queries(storage.read_bytes(path)))
    with pytest.raises(DataError) as err:
        for batch in it:
            queries += batch.queries
    message = str(err.value)
    assert "\n" not in message and f"{url}/shard-0000" in message and "replaced while the loader reads it" in message
    assert not any(q.startswith("~") for q in queries) and len(queries) < 2000
