"""Exact resume: SIGKILL in the middle of a checkpoint save, and preemption by signal under
torchrun (2 gloo processes, DDP), with dropout on (``model.dropout=0.1``), so that every
rank's restored RNG state decides the masks of every step after the resume.

The SIGKILL lands while the step-16 save is half written (after its step-8 checkpoint): the
resume with ``train.resume=auto`` must take step 8, without an error, and continue bit for
bit: the same losses at every later step, the same final weights and the same sample keys on
every rank at every step (so the same set, each key once) as the run that was never
interrupted. The killed-and-resumed run reads its data in the training process or with
``data.num_workers=2`` (DataLoader worker processes, restarted mid-epoch by the resume); the
reference reads in-process, so the worker count must not change training either. The
preempted run (SIGTERM to torchrun, then SIGUSR1 to one worker) must save the step it stops
at on both ranks and end the same way.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_CONFIG, cli_env, run
from dist_harness import assert_exactly_once, consumed_keys, free_port, kill_tree, logged_steps, worker_pid
from dist_launch import ACCELERATE
from hold_save.sitecustomize import hold_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 20
DROPOUT = 0.1  # every encoder dropout (tiny.yaml has none): the RNG restore is under test


def _args(shard_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), f"data.train_manifest={shard_dir}", f"train.output_dir={out}",
            f"train.max_steps={STEPS}", "train.log_every_steps=1", "train.progress_bar=false",
            "checkpoint.every_steps=8", "train.sample_keys_log=true", f"model.dropout={DROPOUT}", *extra]


def _launch_cmd(args: list[str]) -> list[str]:
    return [ACCELERATE, "launch", "--config_file", str(REPO / "configs" / "accelerate" / "cpu_2proc_ddp.yaml"),
            "--main_process_port", str(free_port()), "-m", "clicktower.launcher.train", *args]


def _env() -> dict[str, str]:
    return {**cli_env(), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def _losses(out: Path) -> dict[int, float]:
    # A step logged twice (before the kill and after the resume) keeps its last value.
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "final" / "query_tower" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(shard_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    result = run(_launch_cmd(_args(shard_dir, out, "train.resume=none")), cwd=REPO, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("workers", [0, 2], ids=["in_process", "2_workers"])
def test_sigkill_inside_a_checkpoint_save_then_resume_is_bitwise_identical(reference, shard_dir, tmp_path,
                                                                           workers):
    out = tmp_path / "run"
    root = out / "checkpoints"
    torn = root / ".tmp-step_00000016"
    loader = f"data.num_workers={workers}"
    # tests/support/hold_save (on the launch's PYTHONPATH) holds the step-16 save after every
    # rank wrote its files, before the marker. Wait for every file of the torn save: rank 0's
    # trainer_state.json is written before the weights and before rank 1's RNG state.
    torn_files = [torn / name for name in ("trainer_state.json", "model.safetensors", "random_states_0.pkl",
                                           "random_states_1.pkl")]
    proc = subprocess.Popen(_launch_cmd(_args(shard_dir, out, loader)), cwd=REPO, env=hold_env(16, _env()),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not all(path.is_file() for path in torn_files):
            assert proc.poll() is None, "the run ended before its step-16 save"
            assert time.monotonic() < deadline, "no step-16 save in time"
            time.sleep(0.05)
    finally:
        kill_tree(proc, timeout=30)
    # A real torn save: both ranks' files of step 16 on disk, no marker, never renamed.
    assert (torn / "model.safetensors").is_file() and (torn / "random_states_1.pkl").is_file()
    assert not (torn / "COMPLETE").exists() and not (root / "step_00000016").exists()
    assert (root / "latest").read_text().strip() == "step_00000008"
    assert not (out / "final").exists()
    result = run(_launch_cmd(_args(shard_dir, out, loader)), cwd=REPO, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {root / 'step_00000008'} at step 8" in result.stdout
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["data"]["num_workers"] == workers and resolved["model"]["dropout"] == DROPOUT
    assert f"skipping checkpoint {torn}: incomplete" in result.stderr  # named, not an error
    assert not torn.exists() and (root / "step_00000016" / "COMPLETE").is_file()
    # Each rank logged steps 1-16 before the kill, then 9-20 after the resume: nothing skipped.
    assert {rank: [s for s, _, _ in steps] for rank, steps in logged_steps(out).items()} == \
        {rank: list(range(1, 17)) + list(range(9, STEPS + 1)) for rank in (0, 1)}
    # The same keys on every rank at every step, hence the same set, each key once.
    keys = consumed_keys(out)
    assert keys == consumed_keys(reference)
    assert_exactly_once(keys, STEPS, 2 * 16)
    # metrics.jsonl was cut back to step 8 by the resume: each step once, in order.
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert steps == list(range(1, STEPS + 1))
    expected, got = _losses(reference), _losses(out)
    assert [got[s] for s in range(9, STEPS + 1)] == [expected[s] for s in range(9, STEPS + 1)]
    ref_w, got_w = _weights(reference), _weights(out)
    assert ref_w.keys() == got_w.keys()
    assert all(bool((ref_w[k] == got_w[k]).all()) for k in ref_w)


def _torchrun_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "clicktower.launcher.train", *args]


def _preempted(out: Path, proc: subprocess.Popen, send, agent_reports_workers: bool) -> int:
    """Wait for 3 more logged steps, ``send`` the signal, wait for the exit; the stopped step."""
    done = max(_losses(out), default=0) if (out / "metrics.jsonl").is_file() else 0
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file() or max(_losses(out)) < done + 3:
            assert proc.poll() is None, "the run ended before the signal"
            assert time.monotonic() < deadline, "no progress in time"
            time.sleep(0.05)
        send()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        kill_tree(proc, timeout=30)
    assert "preempted at step" in stdout, stderr[-3000:]
    stopped = int(stdout.split("preempted at step ")[1].split(";")[0])
    assert done + 3 <= stopped < STEPS
    assert (out / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE").is_file()
    assert proc.returncode != 0
    if agent_reports_workers:
        # The workers stopped with EX_TEMPFAIL; torch-elastic's agent reports it and exits 1.
        # (An agent that got the signal itself dies of it instead, without a report.)
        assert re.search(r"exitcode\s*:\s*75", stderr), stderr[-3000:]
    return stopped


def test_preemption_under_torchrun_checkpoints_and_resumes_exactly(reference, shard_dir, tmp_path):
    """SIGTERM to torchrun's agent (what Kubernetes sends a pod's main process; the agent
    forwards it to the workers), then SIGUSR1 to rank 1's worker only (the ranks agree on the
    step): each time both ranks checkpoint the same step and exit 75, and the resumed run
    matches the uninterrupted one (``accelerate launch``) bit for bit, keys included."""
    out = tmp_path / "run"
    first = subprocess.Popen(_torchrun_cmd(_args(shard_dir, out)), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    stop1 = _preempted(out, first, lambda: first.send_signal(signal.SIGTERM), agent_reports_workers=False)

    second = subprocess.Popen(_torchrun_cmd(_args(shard_dir, out)), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    stop2 = _preempted(out, second, lambda: os.kill(worker_pid(second.pid, 1), signal.SIGUSR1),
                       agent_reports_workers=True)
    assert stop1 < stop2

    result = run(_torchrun_cmd(_args(shard_dir, out)), cwd=REPO, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{stop2:08d}'} at step {stop2}" in result.stdout
    expected, got = _losses(reference), _losses(out)
    assert [got[s] for s in range(1, STEPS + 1)] == [expected[s] for s in range(1, STEPS + 1)]
    ref_w, got_w = _weights(reference), _weights(out)
    assert all(bool((ref_w[k] == got_w[k]).all()) for k in ref_w)
    # A preemption saves the step it stops at: each step trained exactly once, in order.
    assert {rank: [s for s, _, _ in steps] for rank, steps in logged_steps(out).items()} == \
        {rank: list(range(1, STEPS + 1)) for rank in (0, 1)}
    assert consumed_keys(out) == consumed_keys(reference)
