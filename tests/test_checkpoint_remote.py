"""Checkpoints in object storage (``checkpoint.remote_dir``), against moto's S3 server on
127.0.0.1 (``tests/support/store_servers.py``, started by the ``s3`` fixture; the standard AWS
settings point the store library at it, clicktower reads none of them):

- uploads with the marker last, ``keep_last`` applied remotely (unfinished uploads older than
  the newest complete one deleted too), verified downloads, corrupt remote copies refused;
- transient errors retried with backoff and counted; an unreachable endpoint is one
  ``ConfigError``; a failed upload is warned about and counted, the local checkpoint kept;
- a run whose local output folder is lost resumes from the bucket with the uninterrupted
  run's losses (``clicktower train`` on one process: a requeued job on a fresh node);
- an unreachable ``remote_dir`` at start: one line and exit status 2 before any training.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from clicktower.launcher.engine.checkpoint import CheckpointConfig, Checkpointer
from clicktower.launcher.engine.checkpoint.files import check_checkpoint, write_complete_marker
from clicktower.launcher.engine.checkpoint.remote import RemoteCheckpoints
from clicktower.launcher.errors import ConfigError
from conftest import REPO, TINY_CONFIG, cli_env, clicktower
from dist_harness import consumed_keys, free_port, keys_per_step, kill_tree
from hold_save.sitecustomize import hold_env
from store_servers import S3_ENV, make_bucket, moto_s3
from test_checkpoint import _setup, _step

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "ckpts"


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server for this module, the standard AWS settings pointing at it."""
    with pytest.MonkeyPatch.context() as mp, moto_s3() as (endpoint, faults):
        env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
        for key, value in env.items():
            mp.setenv(key, value)
        make_bucket(endpoint, BUCKET)
        yield SimpleNamespace(endpoint=endpoint, faults=faults, env=env)


def _fake_checkpoint(root: Path, step: int) -> Path:
    folder = root / f"step_{step:08d}"
    (folder / "pytorch_model").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    (folder / "pytorch_model" / "shard.pt").write_bytes(bytes([step]) * 3000)
    write_complete_marker(folder, step)
    return folder


def _upload_commits(remote: RemoteCheckpoints, root: Path, commits: list[tuple[str, int, int]]) -> None:
    """Upload a fake checkpoint for each ``(lineage id, commit, step)``, in order (each commit's
    parent the one before it), pruning after each as the uploader does."""
    for run, commit, step in commits:
        folder = _fake_checkpoint(root / run, step)
        lineage = {"id": run, "commit": commit, "parent": commit - 1 or None}
        (folder / "trainer_state.json").write_text(json.dumps({"step": step, "lineage": lineage}))
        write_complete_marker(folder, step)
        remote.upload_checkpoint(folder)
        remote.prune(folder.name)
        assert remote.latest() in remote.complete_steps()


@pytest.mark.unit
def test_upload_prune_and_verified_download(s3, tmp_path):
    remote = RemoteCheckpoints(f"s3://{BUCKET}/unit", keep_last=2, backoff_s=0.01)
    remote.check()
    for step in (1, 2, 3):
        remote.upload_checkpoint(_fake_checkpoint(tmp_path / "local", step))
        remote.prune()
    fs = remote._fs()
    # An unfinished older upload (no marker) is garbage; a newer one may be in progress.
    for step in (0, 4):
        fs.pipe_file(remote.path("checkpoints", f"step_{step:08d}", "trainer_state.json"), b"{}")
    remote.prune()
    assert remote.complete_steps() == ["step_00000002", "step_00000003"]
    assert sorted(remote.all_steps()) == ["step_00000002", "step_00000003", "step_00000004"]
    assert fs.cat_file(remote.path("checkpoints", "latest")) == b"step_00000003\n"

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    got = remote.download("step_00000003", fresh)
    assert got == fresh / "step_00000003" and check_checkpoint(got) is None
    assert (got / "pytorch_model" / "shard.pt").read_bytes() == bytes([3]) * 3000
    # A remote copy whose bytes changed (same size): refused by its checksum, nothing left.
    fs.pipe_file(remote.path("checkpoints", "step_00000002", "pytorch_model", "shard.pt"), b"\0" * 3000)
    with pytest.raises(ValueError, match="checksum mismatch"):
        remote.download("step_00000002", fresh)
    assert sorted(p.name for p in fresh.iterdir()) == ["step_00000003"]


@pytest.mark.unit
def test_transient_errors_are_retried_and_counted_unreachable_is_one_error(s3, tmp_path, monkeypatch):
    remote = RemoteCheckpoints(f"s3://{BUCKET}/retry", keep_last=2, backoff_s=0.01)
    s3.faults.fail("/retry/checkpoints/step_00000001/", times=2, status=503, method="PUT")
    remote.upload_checkpoint(_fake_checkpoint(tmp_path, 1))
    assert remote.counts["retries"] == 2 and remote.complete_steps() == ["step_00000001"]

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    unreachable = RemoteCheckpoints(f"s3://{BUCKET}/x", keep_last=2, max_retries=2, backoff_s=0.01)
    with pytest.raises(ConfigError, match=rf"checkpoint.remote_dir=s3://{BUCKET}/x: cannot write there \("):
        unreachable.check()
    assert unreachable.counts["retries"] == 2


@pytest.mark.unit
def test_remote_pruning_keeps_each_runs_commits(s3, tmp_path):
    """Run b uploads beside run a's higher-numbered checkpoints: b's commits survive its
    pruning (keep_last=2), a's are left alone, and a fresh node's auto follows latest to b."""
    from accelerate import Accelerator

    from clicktower.launcher.engine.checkpoint.restore import resolve_resume

    remote = RemoteCheckpoints(f"s3://{BUCKET}/lineage", keep_last=2, backoff_s=0.01)
    _upload_commits(remote, tmp_path, [("a", 1, 16), ("a", 2, 24), ("b", 1, 4), ("b", 2, 8), ("b", 3, 12)])
    assert remote.complete_steps() == ["step_00000008", "step_00000012", "step_00000016", "step_00000024"]
    found = resolve_resume(Accelerator(cpu=True), tmp_path / "fresh" / "checkpoints", "auto", True, remote)
    assert found.name == "step_00000012" and check_checkpoint(found) is None


@pytest.mark.unit
def test_a_node_killed_between_marker_and_pointer_loses_no_upload(s3, tmp_path, capsys):
    """An upload whose ``COMPLETE`` marker is in the bucket but whose ``latest`` write was cut
    off: a fresh node and a node holding the step before both resume from it, not from the
    step the pointer still names; the pointer still picks the run (another lineage's newer
    commit is never taken)."""
    from accelerate import Accelerator

    from clicktower.launcher.engine.checkpoint.restore import resolve_resume

    remote = RemoteCheckpoints(f"s3://{BUCKET}/cutoff", keep_last=3, backoff_s=0.01)
    _upload_commits(remote, tmp_path, [("other", 7, 24), ("a", 1, 4), ("a", 2, 8)])
    # The kill: step 8's files and marker went up, the pointer still names step 4.
    remote._fs().pipe_file(remote.path("checkpoints", "latest"), b"step_00000004\n")
    assert remote.complete_steps() == ["step_00000004", "step_00000008", "step_00000024"]

    fresh = resolve_resume(Accelerator(cpu=True), tmp_path / "fresh" / "checkpoints", "auto", True, remote)
    assert fresh == tmp_path / "fresh" / "checkpoints" / "step_00000008" and check_checkpoint(fresh) is None
    assert "downloaded s3://ckpts/cutoff/checkpoints/step_00000008" in capsys.readouterr().out
    # A node that kept step 4 on its disk fetches step 8 too.
    node = tmp_path / "node" / "checkpoints"
    shutil.copytree(tmp_path / "a" / "step_00000004", node / "step_00000004")
    (node / "latest").write_text("step_00000004\n")
    assert resolve_resume(Accelerator(cpu=True), node, "auto", True, remote) == node / "step_00000008"


@pytest.mark.unit
def test_a_resume_that_went_back_is_not_undone_by_the_bucket(s3, tmp_path):
    """A resume from an earlier commit, killed before its first save: neither its own node
    nor a fresh one takes the commits it went back from (still in the bucket, the remote
    pointer naming the newest); the first save after it is taken even when its pointer
    write was cut off."""
    from accelerate import Accelerator

    from clicktower.launcher.engine.checkpoint.restore import resolve_resume
    from clicktower.launcher.engine.checkpoint.save import continue_lineage

    remote = RemoteCheckpoints(f"s3://{BUCKET}/goback", keep_last=3, backoff_s=0.01)
    _upload_commits(remote, tmp_path, [("a", 1, 4), ("a", 2, 8), ("a", 3, 12)])
    node = tmp_path / "node" / "checkpoints"
    for step in (4, 8, 12):
        shutil.copytree(tmp_path / "a" / f"step_{step:08d}", node / f"step_{step:08d}")
    # train.resume=.../step_00000004: commits 2 and 3 are left; the next commit is 4.
    assert continue_lineage(node / "step_00000004", str(node / "step_00000004"), node, remote) == ("a", 1, 4)
    assert remote.abandoned() == {"a": [(1, 3)]} and remote.latest() == "step_00000012"
    acc = Accelerator(cpu=True)
    assert resolve_resume(acc, node, "auto", True, remote) == node / "step_00000004"
    fresh = tmp_path / "fresh" / "checkpoints"
    assert resolve_resume(acc, fresh, "auto", True, remote) == fresh / "step_00000004"
    # The resumed run's first save (commit 4 after commit 1) went up; its pointer write did not.
    folder = _fake_checkpoint(tmp_path / "after", 6)
    (folder / "trainer_state.json").write_text(json.dumps({"step": 6, "lineage": {"id": "a", "commit": 4,
                                                                                   "parent": 1}}))
    write_complete_marker(folder, 6)
    remote.upload_checkpoint(folder)
    remote._fs().pipe_file(remote.path("checkpoints", "latest"), b"step_00000012\n")
    again = tmp_path / "again" / "checkpoints"
    assert resolve_resume(acc, again, "auto", True, remote) == again / "step_00000006"


@pytest.mark.unit
def test_failed_upload_keeps_the_local_checkpoint_and_a_fresh_node_resumes_from_the_bucket(s3, tmp_path,
                                                                                         caplog, capsys):
    cfg = CheckpointConfig(keep_last=2, remote_dir=f"s3://{BUCKET}/inproc", remote_retries=1)
    acc, model, optimizer, scheduler, ckpt = _setup(tmp_path / "node_a", cfg=cfg)
    assert ckpt.resume("auto") is None  # reachable, nothing to resume
    s3.faults.fail("/inproc/checkpoints/step_00000001/", times=10, status=503, method="PUT")
    best = tmp_path / "node_a" / "best"  # what the periodic evaluation writes
    with caplog.at_level(logging.WARNING):
        _step(model, optimizer, scheduler)
        ckpt.save(1, {"loader": {}})
        _step(model, optimizer, scheduler)
        best.mkdir()
        (best / "weights.bin").write_bytes(b"best")
        (best / "best.json").write_text(json.dumps({"step": 2}))
        ckpt.save(2, {"loader": {}})
        saved = [p.detach().clone() for p in model.parameters()]
        ckpt.finish()
    assert "step_00000001" in caplog.text and "the local checkpoint is kept" in caplog.text
    assert ckpt.remote.counts == {"uploaded": 1, "retries": 1, "failures": 1, "superseded": 0}  # one retry, then given up
    assert check_checkpoint(tmp_path / "node_a" / "checkpoints" / "step_00000001") is None
    assert ckpt.remote.complete_steps() == ["step_00000002"]
    fs = ckpt.remote._fs()
    assert fs.cat_file(ckpt.remote.path("best", "weights.bin")) == b"best"
    # The local copy is as new as the remote one: resumed from the disk, nothing downloaded.
    assert ckpt.resume("auto")["step"] == 2 and "downloaded" not in capsys.readouterr().out

    _step(model, optimizer, scheduler)  # the live state moves on; node B starts with an empty disk
    node_b = Checkpointer(acc, tmp_path / "node_b", cfg, "")
    state = node_b.resume("auto")
    assert "downloaded s3://ckpts/inproc/checkpoints/step_00000002" in capsys.readouterr().out
    assert state["step"] == 2 and check_checkpoint(tmp_path / "node_b" / "checkpoints" / "step_00000002") is None
    assert all(torch.equal(a, b) for a, b in zip(saved, model.parameters()))


def _tower_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _read_tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


class _Killed(BaseException):
    """A kill in the middle of an upload (not an Exception: nothing retries or catches it)."""


@pytest.mark.unit
@pytest.mark.parametrize("where", ["s3", "folder"])
def test_best_and_final_uploads_are_atomic_and_leave_no_stale_files(s3, tmp_path, monkeypatch, where):
    """best/ (or final/) replaced in the bucket or a plain remote folder: while an upload is
    part way (killed after its first file) a reader gets one 'no COMPLETE marker' error, never
    old and new files mixed; after a complete upload it gets exactly the new folder, verified,
    and the old folder's files the new one lacks are gone from the remote."""
    url = f"s3://{BUCKET}/tree" if where == "s3" else str(tmp_path / "remote")
    remote = RemoteCheckpoints(url, keep_last=2, backoff_s=0.01)
    old = {"query_tower/model.safetensors": b"old" * 100, "old_only.txt": b"x", "best.json": b'{"step": 4}'}
    new = {"query_tower/model.safetensors": b"new" * 90, "item_tower/config.json": b"{}", "best.json": b'{"step": 8}'}
    remote.upload_tree(_tower_folder(tmp_path / "old", old), "best")
    assert _read_tree(remote.download_tree("best", tmp_path / "read1")) == old

    real_put, puts = remote._put, []

    def killed_after_one(local, dest):
        if puts:
            raise _Killed()
        puts.append(dest)
        real_put(local, dest)

    monkeypatch.setattr(remote, "_put", killed_after_one)
    with pytest.raises(_Killed):
        remote.upload_tree(_tower_folder(tmp_path / "new", new), "best")
    with pytest.raises(ValueError, match="no COMPLETE marker"):
        remote.download_tree("best", tmp_path / "read2")
    assert not (tmp_path / "read2").exists()

    monkeypatch.setattr(remote, "_put", real_put)
    remote.upload_tree(tmp_path / "new", "best")
    assert _read_tree(remote.download_tree("best", tmp_path / "read3")) == new
    assert sorted(remote._tree_files("best")) == sorted([*new, "COMPLETE"])  # old_only.txt deleted


@pytest.mark.unit
def test_uploads_never_stall_a_save_and_a_waiting_one_is_superseded(s3, tmp_path, monkeypatch):
    """The store hangs (each checkpoint upload held until released): saves 2 and 3 return at
    once all the same (before, the commit of save 2 waited for upload 1); save 3 replaces the
    waiting upload of save 2 (counted, warned about); the folder being uploaded survives the
    local pruning (keep_last=1) until the uploads are done; the end of the run waits for them."""
    cfg = CheckpointConfig(keep_last=1, remote_dir=f"s3://{BUCKET}/stall", remote_retries=1)
    acc, model, optimizer, scheduler, ckpt = _setup(tmp_path, cfg=cfg)
    assert ckpt.resume("auto") is None
    release, started = threading.Event(), threading.Event()
    real_upload = ckpt.remote.upload_checkpoint

    def held_upload(folder):
        started.set()
        assert release.wait(20), "never released"
        return real_upload(folder)

    monkeypatch.setattr(ckpt.remote, "upload_checkpoint", held_upload)
    root = tmp_path / "checkpoints"
    _step(model, optimizer, scheduler)
    ckpt.save(1, {"loader": {}})
    assert started.wait(30)
    began = time.monotonic()
    for step in (2, 3):
        _step(model, optimizer, scheduler)
        ckpt.save(step, {"loader": {}})
    assert time.monotonic() - began < 15 and not release.is_set()  # returned while upload 1 hangs
    assert ckpt.remote.counts["superseded"] == 1
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000001", "step_00000003"]
    release.set()
    ckpt.finish()
    assert ckpt.remote.counts == {"uploaded": 2, "retries": 0, "failures": 0, "superseded": 1}
    assert ckpt.remote.complete_steps() == ["step_00000003"]
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000003"]


# -- end to end: clicktower train on one process ---------------------------------------

STEPS = 12


def _train_args(shards: Path, out: Path, remote: str, *extra: str) -> list[str]:
    return ["train", "--config", str(TINY_CONFIG), f"data.train_manifest={shards}", f"train.output_dir={out}",
            f"train.max_steps={STEPS}", "train.log_every_steps=1", "train.progress_bar=false",
            "train.sample_keys_log=true", "checkpoint.every_steps=4", "checkpoint.keep_last=3",
            f"checkpoint.remote_dir={remote}", "checkpoint.remote_retries=1", *extra]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _kill_once_in_bucket(argv: list[str], url: str, s3, held: int, waited: int, log: Path) -> RemoteCheckpoints:
    """Start ``clicktower *argv`` with its step-``held`` save held, kill its whole tree once
    step ``waited`` is complete in the bucket at ``url``; the bucket's view is returned.

    The kill may land before the upload's ``latest`` write (it follows the marker): once hit
    in CI on a loaded machine, when a resume followed the pointer to the step before; now the
    lineage's newest complete commit is resumed (``test_a_node_killed_between_marker_and_pointer...``)."""
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "clicktower"), *argv],
                                cwd=REPO, env=hold_env(held, {**cli_env(), **s3.env}), stdout=fh, stderr=fh)
    bucket = RemoteCheckpoints(url, keep_last=3)
    try:
        deadline = time.monotonic() + 300
        while f"step_{waited:08d}" not in bucket.complete_steps():
            assert proc.poll() is None, f"the run ended before its step-{held} save:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"step {waited} never reached the bucket"
            time.sleep(0.2)
    finally:
        kill_tree(proc, timeout=30)
    return bucket


@pytest.mark.e2e
@pytest.mark.slow
def test_lost_local_folder_resumes_from_the_bucket_with_the_uninterrupted_losses(s3, shard_dir, tmp_path):
    # The uninterrupted run; the step-4 upload fails for good, the step-8 one once.
    ref = tmp_path / "ref"
    s3.faults.fail("/ref/checkpoints/step_00000004/", times=100, status=503, method="PUT")
    s3.faults.fail("/ref/checkpoints/step_00000008/", times=1, status=503, method="PUT")
    result = clicktower(*_train_args(shard_dir, ref, f"s3://{BUCKET}/ref"), env=s3.env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step_00000004" in result.stderr and "the local checkpoint is kept" in result.stderr
    assert check_checkpoint(ref / "checkpoints" / "step_00000004") is None
    remote = RemoteCheckpoints(f"s3://{BUCKET}/ref", keep_last=3)
    # Uploads run in the background, one waiting behind the running one: on a loaded machine
    # the step-8 upload may still wait behind step 4's failing retries when step 12 is saved,
    # and is then superseded by it (its injected 503 never consumed). Both outcomes are exact.
    if remote.complete_steps() == ["step_00000008", "step_00000012"]:
        summary = "2 checkpoint(s) uploaded to s3://{}/ref (2 retries, 1 failed upload(s))".format(BUCKET)
    else:
        assert remote.complete_steps() == ["step_00000012"]
        summary = ("1 checkpoint(s) uploaded to s3://{}/ref (1 retries, 1 failed upload(s)); 1 superseded "
                   "before their upload started").format(BUCKET)
    assert f"checkpoint.remote_dir: {summary}" in result.stdout, result.stdout[-2000:]
    assert remote._fs().exists(remote.path("final", "query_tower", "model.safetensors"))

    # The same run, killed while its step-12 save is held, once step 8 is in the bucket.
    out, url = tmp_path / "run", f"s3://{BUCKET}/run"
    _kill_once_in_bucket(_train_args(shard_dir, out, url), url, s3, held=12, waited=8,
                         log=tmp_path / "killed_run.log")
    shutil.rmtree(out)  # a fresh node: nothing on the local disk

    result = clicktower(*_train_args(shard_dir, out, url), env=s3.env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"downloaded {url}/checkpoints/step_00000008 to {out / 'checkpoints' / 'step_00000008'}" in result.stdout
    assert f"resumed from {out / 'checkpoints' / 'step_00000008'} at step 8" in result.stdout
    expected, got = _losses(ref), _losses(out)
    # metrics.jsonl came down with the checkpoint: steps 1-8 from the bucket, 9-12 trained
    # again, each step once (the killed run's local file is gone with its disk).
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert steps == list(range(1, STEPS + 1))
    assert [got[s] for s in got] == [expected[s] for s in got]
    ref_keys = keys_per_step(consumed_keys(ref))
    assert keys_per_step(consumed_keys(out)) == {s: ref_keys[s] for s in range(9, STEPS + 1)}


@pytest.mark.e2e
@pytest.mark.slow
def test_async_uploads_then_a_two_rank_resume_from_the_bucket_on_another_world_size(s3, epoch_shard_dir, tmp_path):
    """train.epochs=2 on 320 pairs with checkpoint.async_save and checkpoint.remote_dir: one
    process (32 pairs a step) killed while its step-10 commit is held, once step 5 (mid-epoch
    0) is in the bucket; its output folder deleted; then 2 ranks (10 + 10 pairs a step) on
    the empty disk download step 5 and train to the end of epoch 1. Every pair is trained
    exactly once in each epoch over both runs (the sample-keys logs), the 2-rank run's async
    saves are uploaded, and its final/ reads back whole from the bucket."""
    from test_resume_zero import _cmd

    out, url = tmp_path / "run", f"s3://{BUCKET}/epochs"

    def args(*extra: str) -> list[str]:
        return ["--config", str(TINY_CONFIG), f"data.train_manifest={epoch_shard_dir}", f"train.output_dir={out}",
                "train.max_steps=null", "train.epochs=2", "train.log_every_steps=1", "train.progress_bar=false",
                "train.sample_keys_log=true", "checkpoint.every_steps=5", "checkpoint.keep_last=3",
                "checkpoint.async_save=true", f"checkpoint.remote_dir={url}", *extra]

    bucket = _kill_once_in_bucket(["train", *args("train.batch_size=32")], url, s3, held=10, waited=5,
                                  log=tmp_path / "killed_run.log")
    first = {key: value for key, value in consumed_keys(out).items() if key[1] <= 5}
    shutil.rmtree(out)  # a fresh node: nothing on the local disk

    cmd, env = _cmd("cpu_2proc_ddp", args("train.batch_size=10"))
    result = subprocess.run(cmd, cwd=REPO, env={**env, **s3.env}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"downloaded {url}/checkpoints/step_00000005" in result.stdout
    assert f"resumed from {out / 'checkpoints' / 'step_00000005'} at step 5" in result.stdout
    # 160 pairs left in epoch 0 and 320 in epoch 1, 20 a step: steps 6 to 5 + 8 + 16; steps 1-5
    # come from the metrics.jsonl inside the downloaded checkpoint, each step once.
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 30))
    trained = Counter()
    for (_, step), (epochs, keys) in [*first.items(), *consumed_keys(out).items()]:
        trained.update(zip(keys, epochs))
    assert len(trained) == 640 and set(trained.values()) == {1}  # every pair once in each epoch
    assert len({key for key, _ in trained}) == 320 and {epoch for _, epoch in trained} == {0, 1}
    # Saves at steps 10, 15, 20 and 25, committed at later step boundaries (async): the last
    # one is uploaded (the end of the run waits for it); an earlier one may be superseded.
    assert " 0 failed upload(s)" in result.stdout and bucket.complete_steps()[-1] == "step_00000025"
    final = bucket.download_tree("final", tmp_path / "final")
    assert _read_tree(final) == _read_tree(out / "final")


@pytest.mark.e2e
def test_unreachable_remote_dir_is_one_line_and_exit_2_before_training(shard_dir, tmp_path):
    out = tmp_path / "run"
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    result = clicktower(*_train_args(shard_dir, out, f"s3://{BUCKET}/x"), env=env)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("clicktower: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"clicktower: error: checkpoint.remote_dir=s3://{BUCKET}/x: "
                                                     "cannot write there ("), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
