"""Two hosts for real: network namespaces joined by a bridge (tests/support/netns.py), one
`accelerate launch --num_machines 2 --machine_rank R --main_process_ip <host 0>` per host,
one process each, gloo over the hosts' own interfaces (GLOO_SOCKET_IFNAME).

- DDP and DeepSpeed ZeRO-2 across the two hosts give the losses of the one-host 2-process
  run within 1e-5.
- Faults end in a clean failure within a bounded time, with an error naming the cause, and
  a relaunch resumes exactly (bitwise: the losses after the checkpoint and the final weights
  of the uninterrupted two-host run): one host's processes SIGKILLed mid-run; the host's link
  cut mid-run (a partition, noticed only by train.collective_timeout_s); the main host absent
  at start-up (the rendezvous times out, --rdzv_conf timeout; checked on the killed run's
  folder before its resume).
- SLURM: slurmctld plus one slurmd per host (tests/support/slurm_cluster.py TwoNodeCluster);
  train.sbatch with --nodes 2 trains across them, and when one host's trainer is SIGKILLed
  the job requeues itself, resumes and finishes with the one-host losses.
- No namespace, link or process is left behind, also when a test fails.

Needs root (ip netns); skipped otherwise.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import netns
from conftest import REPO, TINY_CONFIG, cli_env
from dist_harness import kill_tree
from dist_launch import ACCELERATE, accelerate_launch

STEPS = 12
TIMEOUT_S = 20          # train.collective_timeout_s in the fault tests
RDZV_TIMEOUT_S = 20     # torch-elastic's static rendezvous (--rdzv_conf timeout=)
BOUND_S = 150           # a failing launch must have exited by then (timeout + start-up on a busy CPU)
_ports = itertools.count(29600)
_launches = itertools.count(1)


def _args(shard_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), f"data.train_manifest={shard_dir}", f"train.output_dir={out}",
            f"train.max_steps={STEPS}", "train.log_every_steps=1", "train.progress_bar=false",
            "train.batch_size=16", "checkpoint.every_steps=4", *extra]


@pytest.fixture(scope="module")
def hosts():
    """Two test hosts (10.77.0.1, 10.77.0.2); leftovers of a crashed run are removed first."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns) to create test hosts")
    netns.remove_stale()
    with netns.Network(2) as net:
        yield net.hosts
    assert not any(name.startswith(f"{netns.PREFIX}{os.getpid()}") for name in netns.namespaces())


class Launch:
    """One `accelerate launch` per host, started together; output in ``log_dir/launch<N>-host<R>.log``."""

    def __init__(self, hosts: list, ranks: list[int], config: str, args: list[str], log_dir: Path) -> None:
        port = str(next(_ports))  # a fresh port: the last run's may linger in TIME_WAIT
        env = {**cli_env(), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
               "GLOO_SOCKET_IFNAME": hosts[0].ifname}
        if "zero" not in config:
            env["ACCELERATE_USE_CPU"] = "true"
        self.hosts, self.procs, self.logs = hosts, {}, {}
        number = next(_launches)
        for rank in ranks:
            cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "configs" / "accelerate" / f"{config}.yaml"),
                   "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                   "--main_process_ip", hosts[0].address, "--main_process_port", port,
                   "--rdzv_conf", f"timeout={RDZV_TIMEOUT_S}", "-m", "clicktower.launcher.train", *args]
            self.logs[rank] = log_dir / f"launch{number}-host{rank}.log"
            with self.logs[rank].open("w") as log:
                self.procs[rank] = subprocess.Popen(hosts[rank].cmd(cmd), cwd=REPO, env=env, stdout=log,
                                                    stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 600) -> dict[int, int]:
        """Exit status per rank; kills everything still running after ``timeout`` and fails."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs.values()):
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"launch still running after {timeout} s (a hang):\n" + self.tail())
            time.sleep(0.1)
        return {rank: p.returncode for rank, p in self.procs.items()}

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def tail(self) -> str:
        return "\n".join(f"--- host {r}:\n{self.log(r)[-2500:]}" for r in self.procs)

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                kill_tree(proc, timeout=30)

    def __enter__(self) -> "Launch":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        for host in self.hosts:
            host.kill_all()  # torch-elastic workers are in their own process groups


def _run_ok(hosts, config: str, args: list[str], log_dir: Path) -> Launch:
    with Launch(hosts, [0, 1], config, args, log_dir) as launch:
        codes = launch.wait()
        assert codes == {0: 0, 1: 0}, launch.tail()
    return launch


def _losses(out: Path) -> dict[int, float]:
    # A step logged twice (before the fault and after the resume) keeps its last value.
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "final" / "query_tower" / "model.safetensors")


def _wait_for_checkpoint(launch: Launch, out: Path, step: int = 4) -> None:
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / f"step_{step:08d}").is_dir():
        assert all(p.poll() is None for p in launch.procs.values()), "a host ended early:\n" + launch.tail()
        assert time.monotonic() < deadline, "no checkpoint in time:\n" + launch.tail()
        time.sleep(0.05)


def _assert_resumes_exactly(hosts, shard_dir: Path, out: Path, reference: Path, log_dir: Path) -> None:
    launch = _run_ok(hosts, "cpu_2proc_ddp", _args(shard_dir, out, f"train.collective_timeout_s={TIMEOUT_S}"),
                     log_dir)
    match = re.search(r"resumed from \S+step_(\d+) at step (\d+)", launch.log(0))
    assert match, launch.tail()
    resumed = int(match.group(2))
    assert 4 <= resumed < STEPS
    expected, got = _losses(reference), _losses(out)
    assert [got[s] for s in range(resumed + 1, STEPS + 1)] == [expected[s] for s in range(resumed + 1, STEPS + 1)]
    ref_w, got_w = _weights(reference), _weights(out)
    assert ref_w.keys() == got_w.keys() and all(bool((ref_w[k] == got_w[k]).all()) for k in ref_w)
    for host in hosts:
        assert host.pids() == [], f"processes left on {host.name}"


@pytest.fixture(scope="module")
def one_host(shard_dir, tmp_path_factory) -> Path:
    """The same run as 2 processes on ONE host (the baseline)."""
    out = tmp_path_factory.mktemp("onehost") / "run"
    result = accelerate_launch("cpu_2proc_ddp", ["-m", "clicktower.launcher.train", *_args(shard_dir, out)])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_hosts_ddp(hosts, shard_dir, tmp_path_factory) -> Path:
    """The uninterrupted two-host DDP run: the reference the fault tests must resume onto."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    _run_ok(hosts, "cpu_2proc_ddp", _args(shard_dir, out, f"train.collective_timeout_s={TIMEOUT_S}"), out.parent)
    return out


@pytest.mark.e2e
@pytest.mark.slow
def test_ddp_across_two_hosts_matches_one_host(two_hosts_ddp, one_host):
    losses, expected = _losses(two_hosts_ddp), _losses(one_host)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in sorted(losses)] == pytest.approx([expected[s] for s in sorted(losses)], abs=1e-5)
    assert losses[STEPS] < losses[1]


@pytest.mark.e2e
@pytest.mark.slow
def test_zero2_across_two_hosts_matches_one_host(hosts, one_host, shard_dir, tmp_path):
    out = tmp_path / "run"
    _run_ok(hosts, "cpu_2proc_zero2", _args(shard_dir, out), tmp_path)
    losses, expected = _losses(out), _losses(one_host)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in sorted(losses)] == pytest.approx([expected[s] for s in sorted(losses)], abs=1e-5)


def _assert_main_host_absent_fails_clearly(hosts, shard_dir: Path, out: Path, log_dir: Path) -> None:
    """Host 1 starts alone (host 0 is down): the rendezvous times out with the address it
    waited for, and nothing in ``out`` changes."""
    before = sorted(p.name for p in (out / "checkpoints").iterdir()), (out / "metrics.jsonl").read_bytes()
    with Launch(hosts, [1], "cpu_2proc_ddp", _args(shard_dir, out), log_dir) as launch:
        codes = launch.wait(BOUND_S)
    assert codes[1] != 0
    assert (f"The client socket has timed out after {RDZV_TIMEOUT_S * 1000}ms while trying to connect to "
            f"({hosts[0].address}, ") in launch.log(1), launch.tail()
    assert (sorted(p.name for p in (out / "checkpoints").iterdir()), (out / "metrics.jsonl").read_bytes()) == before
    assert hosts[1].pids() == []


@pytest.mark.e2e
@pytest.mark.slow
def test_host_killed_mid_run_fails_fast_then_main_host_absent_then_resumes_exactly(hosts, two_hosts_ddp, shard_dir, tmp_path):
    out = tmp_path / "run"
    with Launch(hosts, [0, 1], "cpu_2proc_ddp", _args(shard_dir, out, f"train.collective_timeout_s={TIMEOUT_S}"),
                tmp_path) as launch:
        _wait_for_checkpoint(launch, out)
        assert hosts[1].kill_all(), "nothing ran on host 1"  # the host "loses power"
        codes = launch.wait(BOUND_S)
    assert codes[0] != 0 and codes[1] != 0
    survivor = launch.log(0)
    # A dead peer's sockets are closed by its kernel: the survivor fails at once, not at the timeout.
    assert "PeerLost: rank 0 (node 0): lost contact with the other training processes" in survivor, launch.tail()
    assert re.search(r"Connection (reset|closed) by peer", survivor), launch.tail()
    assert not (out / "final").exists()
    # Host 0 "rebooting": host 1 is relaunched first, alone.
    _assert_main_host_absent_fails_clearly(hosts, shard_dir, out, tmp_path)
    _assert_resumes_exactly(hosts, shard_dir, out, two_hosts_ddp, tmp_path)


@pytest.mark.e2e
@pytest.mark.slow
def test_link_cut_mid_run_times_out_then_resumes_exactly(hosts, two_hosts_ddp, shard_dir, tmp_path):
    out = tmp_path / "run"
    with Launch(hosts, [0, 1], "cpu_2proc_ddp", _args(shard_dir, out, f"train.collective_timeout_s={TIMEOUT_S}"),
                tmp_path) as launch:
        _wait_for_checkpoint(launch, out)
        hosts[1].cut()
        try:
            codes = launch.wait(BOUND_S)
        finally:
            hosts[1].restore()
    assert codes[0] != 0 and codes[1] != 0
    for rank in (0, 1):
        # No packet (not even a reset) crosses a partition: only the collective timeout ends it.
        assert f"PeerLost: rank {rank} (node {rank}): lost contact" in launch.log(rank), launch.tail()
        assert f"train.collective_timeout_s={TIMEOUT_S}" in launch.log(rank)
    assert f"Timed out waiting {TIMEOUT_S * 1000}ms" in launch.log(0) + launch.log(1), launch.tail()
    _assert_resumes_exactly(hosts, shard_dir, out, two_hosts_ddp, tmp_path)


@pytest.mark.unit
def test_collective_timeout_reaches_the_process_group_even_at_accelerates_default():
    from datetime import timedelta

    from clicktower.launcher.engine.distributed import accelerator_kwargs

    (handler,) = accelerator_kwargs(20)["kwargs_handlers"]
    assert handler.to_kwargs()["timeout"] == timedelta(seconds=20)
    # 600 s equals accelerate's own default, which it would drop (leaving gloo's 30 minutes).
    (handler,) = accelerator_kwargs(600)["kwargs_handlers"]
    assert abs(handler.to_kwargs()["timeout"].total_seconds() - 600) < 0.01


@pytest.mark.unit
@pytest.mark.parametrize("value", ["0", "-5", ".nan", "forever"])
def test_collective_timeout_must_be_a_positive_number(value):
    from clicktower.launcher.engine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="collective_timeout_s"):
        load_config(None, [f"train.collective_timeout_s={value}"])


@pytest.mark.unit
def test_only_backend_errors_become_peer_lost():
    from clicktower.launcher.engine.distributed import PeerLost, peer_loss_errors

    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[10.77.0.2]:54436: Connection reset by peer. This is typically caused by a remote "
                        "worker hanging or bugs in the application.")
    with pytest.raises(PeerLost, match=r"after step 7 \(Read error \[10.77.0.2\]:54436: Connection reset by "
                                       r"peer\): .*collective_timeout_s=20\).*resume from ckpt/step_4"):
        with peer_loss_errors(lambda: 7, 20.0, lambda: "ckpt/step_4"):
            raise gloo
    with pytest.raises(ValueError, match="not a network problem"):
        with peer_loss_errors(lambda: 7, 20.0, lambda: None):
            raise ValueError("not a network problem")


def _slurm(cluster, args: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(cluster.cmd(args), capture_output=True, text=True, timeout=60, env=env)
    return result.stdout


@pytest.mark.e2e
@pytest.mark.slow
def test_slurm_two_nodes_host_killed_requeues_itself_and_finishes(hosts, one_host, shard_dir, tmp_path):
    """train.sbatch with --nodes 2 on a cluster of one slurmd per host: host 1's training
    processes are SIGKILLed after the step-4 checkpoint; the job fails, requeues itself,
    resumes and finishes with the one-host run's losses."""
    import slurm_cluster

    out, log = tmp_path / "run", tmp_path / "job.out"
    with slurm_cluster.TwoNodeCluster(hosts, tmp_path / "slurm") as cluster:
        env = {**cli_env(), **cluster.env, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
               "GLOO_SOCKET_IFNAME": hosts[0].ifname}
        submitted = subprocess.run(cluster.cmd([
            str(Path(ACCELERATE).parent / "clicktower"), "slurm", "submit", "--config", str(TINY_CONFIG),
            "--nodes", "2", "--gpus-per-node", "0", "--procs-per-node", "1", "--cpus-per-task", str(os.cpu_count()),
            "--accelerate-config", str(REPO / "configs" / "accelerate" / "cpu_2proc_ddp.yaml"), "--time", "15",
            "--output", str(log), "--job-name", "clicktower-2node",
            *_args(shard_dir, out, f"train.collective_timeout_s={TIMEOUT_S}")[2:]]),
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert submitted.returncode == 0, submitted.stderr
        job = submitted.stdout.strip().splitlines()[-1]

        def state() -> str:
            return _slurm(cluster, ["scontrol", "show", "job", job], env)

        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step_00000004").is_dir():
            assert time.monotonic() < deadline, f"no checkpoint in time:\n{state()}\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        killed = []
        for pid in hosts[1].pids():  # the trainer (agent and worker), not the node's slurmd
            try:
                if b"clicktower.launcher.train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, 9)
                    killed.append(pid)
            except (OSError, ProcessLookupError):
                pass
        assert killed, "no trainer ran on host 1"
        deadline = time.monotonic() + 400
        while "JobState=COMPLETED" not in state():
            assert time.monotonic() < deadline and "JobState=FAILED" not in state(), \
                f"{state()}\n{log.read_text()[-4000:]}"
            time.sleep(1)
        assert "Restarts=1" in state() and "NodeList=n[0-1]" in state()
    text = log.read_text()
    assert "on 2 node(s) x 1 process(es), main n0:" in text
    assert "lost contact with the other training processes" in text
    assert "requeueing job" in text and "train.sbatch: training finished" in text
    assert re.search(r"resumed from \S+step_0000000[48] at step [48]", text), text[-3000:]
    losses, expected = _losses(out), _losses(one_host)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in sorted(losses)] == pytest.approx([expected[s] for s in sorted(losses)], abs=1e-5)
    for host in hosts:
        assert host.pids() == [], f"processes left on {host.name}"
