"""SLURM: ``clicktower slurm submit`` renders train.sbatch; a preempted job checkpoints,
requeues itself and resumes exactly.

The end-to-end test runs a real one-node cluster (``.ci/setup_slurm.sh``, started here when
none answers and we are root): a tiny 2-process CPU training submitted with the CLI, signalled
twice mid-run, once with ``scancel --signal=USR1 JOB`` (what reaches the job's steps) and once
with ``scancel --batch --signal=USR1 JOB`` (what ``#SBATCH --signal=B:USR1@grace`` does before
the time limit: only the batch shell, which forwards it). Its losses must equal an
uninterrupted run's bit for bit, and so must the sample keys every rank trained on at every
step: the data order continued exactly once.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import slurm_cluster
from conftest import REPO, TINY_CONFIG, cli_env, clicktower
from dist_harness import assert_exactly_once, consumed_keys, free_port, kill_tree
from dist_launch import ACCELERATE

pytestmark = pytest.mark.e2e

STEPS = 60
CPU_DDP = REPO / "configs" / "accelerate" / "cpu_2proc_ddp.yaml"


def _train_args(shard_dir: Path, out: Path) -> list[str]:
    return [f"data.train_manifest={shard_dir}", f"train.output_dir={out}", f"train.max_steps={STEPS}",
            "train.log_every_steps=1", "train.progress_bar=false", "checkpoint.every_steps=10",
            "train.sample_keys_log=true"]


def _env() -> dict[str, str]:
    return {**cli_env(), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def _losses(out: Path) -> dict[int, float]:
    # A step logged twice (before a preemption and after the resume) keeps its last value.
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _wait(condition, timeout: float, what: str, job: str | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log is not None and log.is_file() else ""
            pytest.fail(f"timed out waiting for {what}; job state "
                        f"{slurm_cluster.job_field(job, 'JobState') if job else '-'}\n{tail}")
        time.sleep(0.2)


def test_dry_run_renders_the_packaged_template(tmp_path):
    result = clicktower("slurm", "submit", "--config", str(TINY_CONFIG), "--nodes", "4", "--gpus-per-node", "8",
                        "--time", "2:00:00", "--partition", "gpu", "--accelerate-config",
                        "configs/accelerate/multinode_ddp.yaml", "--dry-run", "train.max_steps=7",
                        "train.output_dir=runs/a b")
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --time=2:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue",
                 f"export CLICKTOWER_CONFIG={TINY_CONFIG}", "export CLICKTOWER_PROCS_PER_NODE=8",
                 f"export CLICKTOWER_ACCELERATE_CONFIG={REPO / 'configs/accelerate/multinode_ddp.yaml'}"):
        assert line in script.splitlines(), line
    assert script.count("#SBATCH --nodes=") == 1
    # sbatch reads #SBATCH lines only before the first command.
    first_command = next(i for i, l in enumerate(script.splitlines()) if l and not l.startswith("#"))
    assert all(i < first_command for i, l in enumerate(script.splitlines()) if l.startswith("#SBATCH"))
    # The overrides survive the shell: a value with a space stays one word.
    export = re.search(r"^export CLICKTOWER_OVERRIDES=.*$", script, re.M).group(0)
    words = subprocess.run(["bash", "-c", export + '; eval "o=($CLICKTOWER_OVERRIDES)"; printf "%s\\n" "${o[@]}"'],
                           capture_output=True, text=True).stdout.splitlines()
    assert words == ["train.max_steps=7", "train.output_dir=runs/a b"]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_submit_errors_are_one_line(tmp_path):
    no_sbatch = {**cli_env(), "PATH": str(tmp_path)}  # no sbatch anywhere on PATH
    result = subprocess.run([sys.executable, "-m", "clicktower.launcher.cli", "slurm", "submit", "--config",
                             str(TINY_CONFIG), "--nodes", "1", "--gpus-per-node", "0"],
                            env=no_sbatch, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("clicktower: error: sbatch not found")
    assert len(result.stderr.strip().splitlines()) == 1
    result = clicktower("slurm", "submit", "--config", str(TINY_CONFIG), "--nodes", "1", "--gpus-per-node", "0",
                        "--dry-run", "train.no_such_key=1")
    assert result.returncode == 2 and "train.no_such_key" in result.stderr


@pytest.fixture(scope="module")
def slurm():
    yield from slurm_cluster.cluster()


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm, shard_dir, tmp_path):
    ref_out, out, log = tmp_path / "ref", tmp_path / "run", tmp_path / "job.out"
    # The uninterrupted reference runs beside the job (outside SLURM): same config, no signal.
    reference = subprocess.Popen(
        [ACCELERATE, "launch", "--config_file", str(CPU_DDP), "--main_process_port", str(free_port()),
         "-m", "clicktower.launcher.train", "--config", str(TINY_CONFIG), *_train_args(shard_dir, ref_out),
         "train.resume=none"], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    job = None
    try:
        submitted = subprocess.run(
            [str(Path(sys.executable).parent / "clicktower"), "slurm", "submit", "--config", str(TINY_CONFIG),
             "--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", "2", "--cpus-per-task", "2",
             "--accelerate-config", str(CPU_DDP), "--time", "15", "--output", str(log),
             "--job-name", "clicktower-test", *_train_args(shard_dir, out)],
            cwd=tmp_path, env={**_env(), "CLICKTOWER_MAIN_PORT": str(free_port())},
            capture_output=True, text=True, timeout=120)
        assert submitted.returncode == 0, submitted.stderr
        job = submitted.stdout.strip().splitlines()[-1]
        assert job.isdigit(), submitted.stdout

        # 1: the signal to the job's steps (torch-elastic's agent ignores it, the workers save).
        _wait(lambda: len(_losses(out)) >= 3, 150, "3 logged steps", job, log)
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
        _wait(lambda: "(restart count 1)" in log.read_text() and "resumed from" in log.read_text(), 120,
              "the requeued job to resume", job, log)
        first_stop = int(re.search(r"preempted at step (\d+)", log.read_text()).group(1))
        assert first_stop < STEPS

        # 2: the signal to the batch shell only (as before the time limit), which forwards it.
        _wait(lambda: max(_losses(out)) >= first_stop + 3, 120, "3 steps after the resume", job, log)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
        _wait(lambda: not slurm_cluster.in_queue(job), 180, "the job to finish", job, log)

        text = log.read_text()
        assert slurm_cluster.job_field(job, "JobState") == "COMPLETED", text[-3000:]
        assert slurm_cluster.job_field(job, "Restarts") == "2", text[-3000:]
        # Every rank prints its "preempted at step N" line.
        stops = list(dict.fromkeys(int(s) for s in re.findall(r"preempted at step (\d+)", text)))
        resumes = re.findall(r"resumed from (\S+) at step (\d+)", text)
        assert len(stops) == 2 and stops[0] < stops[1] < STEPS, text[-3000:]
        assert [int(s) for _, s in resumes] == stops
        assert [Path(p).name for p, _ in resumes] == [f"step_{s:08d}" for s in stops]
        assert "got SIGUSR1: forwarding SIGUSR1" in text
        assert text.count("requeueing job") == 2 and "train.sbatch: training finished" in text
        assert (out / "final" / "query_tower").is_dir()

        assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
        expected, got = _losses(ref_out), _losses(out)
        assert sorted(got) == list(range(1, STEPS + 1))
        assert [got[s] for s in range(1, STEPS + 1)] == [expected[s] for s in range(1, STEPS + 1)]
        # Exactly-once by the keys themselves: every rank trained on the same samples at every
        # step as the uninterrupted run, and no sample came twice in an epoch.
        keys = consumed_keys(out)
        assert keys == consumed_keys(ref_out)
        assert_exactly_once(keys, STEPS, 2 * 16)
    finally:
        if job is not None:
            slurm_cluster.cancel_and_wait(job)
        if reference.poll() is None:
            kill_tree(reference)
    # Nothing of the job outlives it (workers, agents, the node scripts).
    _wait(lambda: not slurm_cluster.processes_mentioning(str(out)), 30, "the job's processes to exit")
    assert not slurm_cluster.processes_mentioning(str(ref_out))
