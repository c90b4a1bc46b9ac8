"""Storage faults on loopback: ``tests/support/faultproxy.py`` between the clients and moto's S3
server on 127.0.0.1 drops connections, answers 500 / 503 SlowDown, stalls past the client's
read timeout and truncates bodies, at a seeded rate (issue 26, part 2).

- unit: every fault a read or an upload meets is retried and counted by clicktower (user
  ``config_kwargs`` included: they used to replace the one-attempt setting, and botocore then
  retried 5xx answers itself, uncounted), and a truncated body is never taken for the data;
- e2e: ``clicktower train`` on 2 ranks (``accelerate launch``) reading its shards through the
  proxy with ``data.cache_dir``; then the same with ``checkpoint.remote_dir`` (through the
  proxy) and ``checkpoint.async_save``, SIGKILLed during a local save and during an upload and
  resumed from the bucket on an empty disk each time. Every pair is trained exactly once per
  epoch, the losses equal a fault-free run's, only complete checkpoints are resumed from, and
  ``metrics.jsonl`` counts the retries. ``benchmarks/bench_faults.py`` runs the same at larger
  scale and records the counts.
"""
from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from fault_runs import Scenario, check, data_run, killed_run, launch, metrics
from faultproxy import FaultProxy
from store_servers import S3_ENV, make_bucket, moto_s3

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "faults"
STALL_S = 4.0   # past the client's 2 s read timeout (Scenario.timeout_s): stalls time out and are retried
EPOCHS = 2


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server for this module; this process talks to it directly."""
    with pytest.MonkeyPatch.context() as mp, moto_s3() as (endpoint, _):
        for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(key, value)
        make_bucket(endpoint, BUCKET)
        yield SimpleNamespace(endpoint=endpoint)


# -- unit: retries counted, truncation refused -------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("kinds", [("500", "503"), ("truncate",), pytest.param(("stall",), marks=pytest.mark.slow),
                                   ("drop",)])
def test_storage_reads_through_faults_are_exact_and_every_retry_counted(s3, kinds, monkeypatch):
    from clicktower.data.storage import Storage

    blob = random.Random(0).randbytes(200_000)
    Storage().write_bytes(f"s3://{BUCKET}/blob", blob)
    # Parts, and the whole object as a range (what the node cache asks for a small shard).
    ranges = [(i * 7_000, i * 7_000 + 30_000) for i in range(10)] + [(0, len(blob))] * 4
    version = Storage().version(f"s3://{BUCKET}/blob")   # what the loader pins (blockio)
    with FaultProxy(s3.endpoint, rate=0.5, seed=3, kinds=kinds, stall_s=2.0, methods=("GET",)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        # User config_kwargs (a short read timeout) must keep the one-attempt default.
        storage = Storage({"config_kwargs": {"read_timeout": 1, "connect_timeout": 1}}, max_retries=4,
                          backoff_s=0.01)
        fs = storage.filesystem(f"s3://{BUCKET}/blob")
        got = [storage.read_range(f"s3://{BUCKET}/blob", a, b, version) for a, b in ranges]
        # Whole objects: the answer carries the object's checksum, which a cut body fails.
        whole = [storage.read_bytes(f"s3://{BUCKET}/blob") for _ in range(3)]
    assert got == [blob[a:b] for a, b in ranges] and whole == [blob] * 3   # no short body taken for data
    faults = proxy.counts.total()
    assert fs.retries == 1 and faults > 0, proxy.summary()
    if kinds == ("drop",):
        # aiohttp re-sends an idempotent request once, itself, when its connection closes
        # before any answer (it cannot tell that from a server closing an idle keep-alive
        # connection): those do not reach clicktower's count; a second drop in a row does.
        assert 0 < storage.stats.retries <= faults
    else:   # every fault failed one attempt, and clicktower retried and counted it
        assert storage.stats.retries == faults, (storage.stats.retries, proxy.summary())


@pytest.mark.unit
@pytest.mark.slow   # ~15 s with 2 loaded cores (stalls wait for the client's timeout)
def test_checkpoint_upload_and_download_through_faults(s3, tmp_path, monkeypatch):
    from test_checkpoint_remote import _fake_checkpoint

    from clicktower.launcher.engine.checkpoint.files import check_checkpoint
    from clicktower.launcher.engine.checkpoint.remote import RemoteCheckpoints

    with FaultProxy(s3.endpoint, rate=0.3, seed=5, stall_s=2.0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        remote = RemoteCheckpoints(f"s3://{BUCKET}/unit", keep_last=2, backoff_s=0.01,
                                   options={"config_kwargs": {"read_timeout": 1, "connect_timeout": 1}})
        for step in (1, 2, 3):
            remote.upload_checkpoint(_fake_checkpoint(tmp_path / "local", step))
            remote.prune()
        (tmp_path / "fresh").mkdir()
        got = remote.download("step_00000003", tmp_path / "fresh")
        assert remote.complete_steps() == ["step_00000002", "step_00000003"]
    assert check_checkpoint(got) is None and (got / "pytorch_model" / "shard.pt").read_bytes() == bytes([3]) * 3000
    assert proxy.counts.total() >= 5 and remote.counts["retries"] > 0, proxy.summary()
    assert remote.counts["retries"] <= proxy.counts.total()


@pytest.mark.unit
def test_input_globs_on_s3_are_retried(s3, monkeypatch):
    """``clicktower shard s3://.../2024-*/part-*.jsonl``: the listings behind the glob are
    retried (one 503 used to stop the command)."""
    from clicktower.data.shards import expand_inputs
    from clicktower.data.storage import Storage

    names = [f"s3://{BUCKET}/logs/2024-0{m}/part-{i}.jsonl" for m in (1, 2, 3) for i in (0, 1)]
    for name in names:
        Storage().write_bytes(name, b"{}\n")
    # A glob is several listings, retried together: one 503 in a row per listing at most.
    with FaultProxy(s3.endpoint, rate=0.3, seed=0, kinds=("503",), methods=("GET",), max_in_a_row=1) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        assert expand_inputs([f"s3://{BUCKET}/logs/2024-*/part-*.jsonl"]) == names
    assert proxy.counts["503"] > 0


@pytest.mark.unit
def test_proxy_decisions_are_a_function_of_the_seed(s3):
    def decisions(seed: int) -> list:
        proxy = FaultProxy(s3.endpoint, rate=0.3, seed=seed)
        return [proxy.decide("GET", f"/b/k{i % 7}", "") for i in range(200)]

    assert decisions(1) == decisions(1) != decisions(2)
    drawn = decisions(1)
    assert 30 <= sum(d is not None for d in drawn) <= 90 and {d for d in drawn if d} == {"drop", "500", "503",
                                                                                         "stall", "truncate"}
    with pytest.raises(ValueError, match="127.0.0.1 only"):
        FaultProxy("http://example.com:80", rate=0.1, seed=0)


# -- e2e: clicktower train on 2 ranks through the proxy (tests/support/fault_runs.py) ----------

@pytest.fixture(scope="module")
def s3_shards(s3, epoch_shard_dir) -> str:
    """The 320 pairs' shard set copied to the bucket."""
    from clicktower.data.storage import Storage

    storage = Storage()
    for path in sorted(epoch_shard_dir.iterdir()):
        storage.put_file(str(path), f"s3://{BUCKET}/shards/{path.name}")
    return f"s3://{BUCKET}/shards"


@pytest.fixture(scope="module")
def fault_free(epoch_shard_dir, tmp_path_factory) -> Path:
    """The same training from the local shards, no proxy, no checkpoints: the reference."""
    root = tmp_path_factory.mktemp("fault_free")
    launch(Scenario(str(epoch_shard_dir)).args(root / "run"), {}, root / "run.log")
    return root / "run"


@pytest.fixture(scope="module")
def all_keys(epoch_shard_dir) -> set[str]:
    """The keys of the 320 pairs (one epoch of 10 batches of 32 reads them all)."""
    from clicktower.data.loader import ClickPairLoader, DataConfig, Rank

    loader = ClickPairLoader(DataConfig(num_workers=0), str(epoch_shard_dir), 32, Rank(0, 1), 0)
    keys = {k for batch in loader for k in batch.keys}
    assert len(keys) == 320
    return keys


def _assert_proved(result: dict, fault_free: Path, all_keys: set[str], scn: Scenario) -> None:
    proved = check(result, fault_free, all_keys, scn)
    assert proved == {"pairs_lost": 0, "pairs_duplicated": 0, "epochs_seen": EPOCHS, "losses_equal_fault_free": True,
                      "steps_trained": True}, proved


@pytest.mark.e2e
@pytest.mark.slow
def test_two_ranks_read_their_shards_through_faults(s3, s3_shards, fault_free, all_keys, tmp_path):
    scn = Scenario(s3_shards)
    with FaultProxy(s3.endpoint, rate=0.3, seed=11, stall_s=STALL_S) as proxy:
        result = data_run(scn, proxy, tmp_path)
    faults = proxy.counts.total()
    assert faults >= 3, proxy.summary()
    _assert_proved(result, fault_free, all_keys, scn)   # losses bit for bit: the same bytes, the same order
    last = metrics(result["attempts"][0])[-1]
    assert last["data_io_error"] == 0 and 0 < result["retries"]["data"] <= faults, (result["retries"], faults)


@pytest.mark.e2e
@pytest.mark.slow
def test_two_ranks_with_remote_async_checkpoints_killed_and_resumed_through_faults(s3, s3_shards, fault_free,
                                                                                  all_keys, tmp_path):
    scn = Scenario(s3_shards)
    with FaultProxy(s3.endpoint, rate=0.15, seed=26, stall_s=STALL_S) as proxy:
        result = killed_run(scn, proxy, tmp_path, f"s3://{BUCKET}/run", seed=26)
    # Killed in the async write of a local save (never committed), then in an upload (files
    # there, no marker): each resume took the newest complete checkpoint in the bucket.
    assert result["local_save_unfinished"] and result["upload_unfinished"], result
    assert result["resumed"] == result["expected_resumes"], result
    _assert_proved(result, fault_free, all_keys, scn)
    # The last attempt started on an empty disk: steps up to its resume come from the
    # metrics.jsonl inside the downloaded checkpoint, the rest it trained; each step once.
    steps = [r["step"] for r in metrics(result["attempts"][-1]) if "loss" in r]
    assert steps == list(range(1, scn.steps + 1))
    # The retries are in metrics.jsonl (every rank's reads, the uploads), bounded by the faults.
    retries = result["retries"]["data"] + result["retries"]["remote"]
    assert result["retries"]["remote"] > 0 and retries <= proxy.counts.total(), (result["retries"], proxy.summary())
    # keep_last=2 in the bucket, the last save's upload awaited at the end; the one before may
    # have been superseded while it waited behind a slow (faulted) upload, leaving an older one.
    complete = result["remote_complete"]
    assert len(complete) == 2 and complete[-1] == f"step_{scn.steps:08d}", result
