"""Ctrl-C during ``clicktower train`` (a real subprocess, the tiny BERT): the first SIGINT (to
the process group, as a terminal sends it) checkpoints the step in flight and exits 75 with the
command that resumes, and that command resumes from the checkpoint with each step once in
``metrics.jsonl``; a second SIGINT aborts at once, without a checkpoint. The same under
``accelerate launch`` with 2 processes, where the terminal's Ctrl-C reaches only torchrun's
agent (its workers have process groups of their own) and the agent passes it on.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_CONFIG, clicktower, cli_env
from dist_launch import accelerate_command, accelerate_launch
from hold_save.sitecustomize import hold_env
from procs import kill_tree

from clicktower.launcher.engine.checkpoint import check_checkpoint

CLICKTOWER = str(Path(sys.executable).parent / "clicktower")


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    # Many more steps than the test waits for: the run is always interrupted mid-way.
    return ["train", "--config", str(TINY_CONFIG), f"data.train_manifest={shards}", f"train.output_dir={out}",
            "train.max_steps=100000", "train.log_every_steps=1", "train.progress_bar=false", *extra]


def _steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def _wait(proc: subprocess.Popen, ready, what: str, log: Path) -> None:
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in time"
        time.sleep(0.05)


def _ctrl_c_after_3_steps(proc: subprocess.Popen, out: Path, log: Path) -> tuple[int, str]:
    """One SIGINT to the run's process group once 3 steps are logged: ``(exit status, log)``."""
    try:
        _wait(proc, lambda: len(_steps(out)) >= 3, "3 logged steps", log)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        kill_tree(proc, timeout=30)
    return rc, log.read_text()


def _stopped_once(text: str, out: Path) -> tuple[int, Path]:
    """The run said "Ctrl-C" once and stopped after a complete checkpoint of its last logged
    step, each step once in metrics.jsonl: ``(step, checkpoint folder)``."""
    assert text.count("Ctrl-C: saving a checkpoint at the end of this step") == 1, text[-3000:]
    stopped = re.search(r"^preempted at step (\d+); checkpoint (\S+)$", text, re.M)
    assert stopped, text[-3000:]
    step, folder = int(stopped[1]), Path(stopped[2])
    assert folder == out / "checkpoints" / f"step_{step:08d}" and check_checkpoint(folder) is None
    assert _steps(out) == list(range(1, step + 1))
    return step, folder


def _ctrl_c_twice_during_held_save(proc: subprocess.Popen, saving, interrupt, log: Path) -> tuple[int, float, str]:
    """Ctrl-C once the held save has begun (``saving()``), check the run waits for it, Ctrl-C
    again: ``(exit status, seconds from the second Ctrl-C to the end, log)``.

    Args:
        interrupt: sends one Ctrl-C to the run.
    """
    try:
        _wait(proc, saving, "the held step-4 save", log)
        interrupt()
        time.sleep(1.0)
        assert proc.poll() is None, "one Ctrl-C must wait for the checkpoint"
        interrupt()
        sent = time.monotonic()
        rc = proc.wait(timeout=60)
        waited = time.monotonic() - sent
    finally:
        kill_tree(proc, timeout=30)
    return rc, waited, log.read_text()


@pytest.mark.e2e
@pytest.mark.slow
def test_first_ctrl_c_checkpoints_and_prints_the_command_that_resumes(shard_dir, tmp_path):
    """As at a terminal: SIGINT to the whole process group, DataLoader workers included (they
    must neither die nor answer: one message, one checkpoint)."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    # train.resume=new, not auto: the printed command must say auto.
    args = _args(shard_dir, out, "train.resume=new", "data.num_workers=2")
    with open(log, "w") as fh:
        proc = subprocess.Popen([CLICKTOWER, *args], cwd=REPO, env=cli_env(), stdout=fh, stderr=fh,
                                start_new_session=True)
    rc, text = _ctrl_c_after_3_steps(proc, out, log)
    assert rc == 75, text[-3000:]
    step, folder = _stopped_once(text, out)
    command = re.search(r"^resume with: (.*)$", text, re.M)[1]
    expected = [a for a in args if a != "train.resume=new"] + ["train.resume=auto"]
    assert command == "clicktower train " + shlex.join(expected[1:]), text[-3000:]

    # The printed command, as pasted (a shorter run: a later override wins), resumes there.
    pasted = shlex.split(command)
    result = clicktower(*pasted[1:], f"train.max_steps={step + 2}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {folder} at step {step}" in result.stdout
    assert _steps(out) == list(range(1, step + 3))


@pytest.mark.e2e
def test_second_ctrl_c_aborts_at_once_without_a_checkpoint(shard_dir, tmp_path):
    """The first Ctrl-C arrives while the step-4 save is held (tests/support/hold_save: two
    minutes between its files and its marker); the second ends the run within seconds."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    torn = out / "checkpoints" / ".tmp-step_00000004"
    with open(log, "w") as fh:
        proc = subprocess.Popen([CLICKTOWER, *_args(shard_dir, out, "checkpoint.every_steps=4")], cwd=REPO,
                                env=hold_env(4, cli_env()), stdout=fh, stderr=fh)
    rc, waited, text = _ctrl_c_twice_during_held_save(
        proc, lambda: (torn / "trainer_state.json").is_file() and (torn / "model.safetensors").is_file(),
        lambda: proc.send_signal(signal.SIGINT), log)
    assert rc == 130 and "clicktower: interrupted" in text, text[-3000:]
    assert waited < 10, f"the second Ctrl-C took {waited:.1f} s"
    assert not (out / "checkpoints" / "step_00000004").exists() and "resume with:" not in text


def _launch(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """``accelerate launch`` of 2 CPU processes in a session of its own, as from a terminal."""
    command, extra = accelerate_command("cpu_2proc_ddp", ["-m", "clicktower.launcher.train", *args[1:]])
    with open(log, "w") as fh:
        return subprocess.Popen(command, cwd=REPO, env={**env, **extra}, stdout=fh, stderr=fh,
                                start_new_session=True)


@pytest.mark.e2e
@pytest.mark.slow
def test_ctrl_c_under_accelerate_launch_checkpoints_every_rank_once(shard_dir, tmp_path):
    """One Ctrl-C to the launcher's process group: both ranks stop after the same step, one
    checkpoint, one message, the resume line; the launch command with it resumes there. The
    exit status is the agent's (torchrun reports 130 for a SIGINT), not 75."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    args = _args(shard_dir, out)
    rc, text = _ctrl_c_after_3_steps(_launch(args, log, cli_env()), out, log)
    assert rc != 0, text[-3000:]
    step, folder = _stopped_once(text, out)
    command = re.search(r"^resume with: the same launch command with: (.*)$", text, re.M)[1]
    pasted = shlex.split(command)
    assert pasted[:2] == ["-m", "clicktower.launcher.train"] and "train.resume=auto" not in pasted

    result = accelerate_launch("cpu_2proc_ddp", [*pasted, f"train.max_steps={step + 2}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {folder} at step {step}" in result.stdout + result.stderr
    assert _steps(out) == list(range(1, step + 3))


@pytest.mark.e2e
def test_second_ctrl_c_under_accelerate_launch_aborts_at_once(shard_dir, tmp_path):
    """The agent passes a second Ctrl-C on as SIGTERM; the workers take it as the second Ctrl-C
    (not as one more stop request that would wait for the held save)."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    torn = out / "checkpoints" / ".tmp-step_00000004"
    proc = _launch(_args(shard_dir, out, "checkpoint.every_steps=4"), log, hold_env(4, cli_env()))
    rc, waited, text = _ctrl_c_twice_during_held_save(
        proc, lambda: (torn / "trainer_state.json").is_file(), lambda: os.killpg(proc.pid, signal.SIGINT), log)
    assert rc != 0 and "resume with:" not in text, text[-3000:]
    assert waited < 10, f"the second Ctrl-C took {waited:.1f} s:\n{text[-3000:]}"
    assert not (out / "checkpoints" / "step_00000004").exists()


@pytest.mark.unit
def test_the_handlers_are_given_back_when_the_loop_ends():
    """train() called from Python leaves the caller's Ctrl-C as it was once its loop is over."""
    from clicktower.launcher.engine.observers import CheckpointObserver
    from clicktower.launcher.engine.preemption import PreemptionHandler, resume_command

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    observer = CheckpointObserver(checkpointer=None, preemption=PreemptionHandler(accelerator=None).install())
    assert signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]
    observer.close()
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert resume_command(["--config", "c.yaml", "a=1"], "auto", launched=False) == \
        "clicktower train --config c.yaml a=1"
    assert resume_command(["--config", "my run.yaml", "train.resume=new"], "new", launched=True) == \
        "the same launch command with: -m clicktower.launcher.train --config 'my run.yaml' train.resume=auto"
