"""A SLURM cluster for the tests: the running one, or a one-node cluster started (as root) by
``.ci/setup_slurm.sh`` and stopped again by whoever started it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO

SETUP = REPO / ".ci" / "setup_slurm.sh"


def sinfo_answers() -> bool:
    """Whether a controller answers and has a node that can run jobs."""
    if shutil.which("sinfo") is None:
        return False
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0 and bool(re.search(r"idle|mixed|alloc", result.stdout))


def cluster():
    """Generator for a fixture: yields once a cluster answers; skips only where none can be had
    (not root, or no SLURM and no apt-get); stops the daemons only if it started them."""
    if sinfo_answers():
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("no SLURM cluster answers and not root: cannot start one (run .ci/setup_slurm.sh as root)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("no SLURM installed and no apt-get to install slurm-wlm")
    result = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        subprocess.run(["bash", str(SETUP), "stop"], capture_output=True, timeout=120)
        pytest.fail(f"{SETUP} failed: {(result.stdout + result.stderr)[-2000:]}")
    try:
        yield
    finally:
        subprocess.run(["bash", str(SETUP), "stop"], capture_output=True, timeout=120)


def job_field(job_id: str, field: str) -> str | None:
    """A field of ``scontrol show job`` (``JobState``, ``Restarts``...), None once forgotten."""
    result = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    match = re.search(rf"\b{field}=(\S+)", result.stdout)
    return match.group(1) if match else None


def in_queue(job_id: str) -> bool:
    result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return bool(result.stdout.strip())


def cancel_and_wait(job_id: str, timeout: float = 90) -> None:
    """Cancel a job if it is still queued or running, and wait until SLURM has let it go."""
    deadline = time.monotonic() + timeout
    while in_queue(job_id) and time.monotonic() < deadline:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
        time.sleep(1)
    if in_queue(job_id):
        subprocess.run(["scancel", "--signal=KILL", "--full", job_id], capture_output=True, timeout=30)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (leftover checks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name}: {cmdline[:200]}")
    return found


TWO_NODE_CONF = """\
ClusterName=ctmn
SlurmctldHost={nodes[0]}({addrs[0]})
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/ctld
SlurmdSpoolDir={dir}/slurmd-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=10
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
{node_lines}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""


class TwoNodeCluster:
    """slurmctld plus one slurmd per test host (tests/support/netns.py), each node named ``n<i>`` with
    ``NodeAddr`` its host's address, configured by its own ``slurm.conf`` (``SLURM_CONF``) so
    that a one-node cluster of ``.ci/setup_slurm.sh`` can run beside it.

    Each daemon runs in its host's network namespace (``nsenter --net``, which keeps the
    machine's /sys and its cgroup mount that slurmd needs; ``ip netns exec`` remounts /sys) and
    in private UTS and mount namespaces: the hostname is the node name (slurmctld checks it)
    and /etc/hosts names every node (the job script resolves its first node). Job steps inherit
    all of that. Client commands run on host 0 (:meth:`cmd`).

    Args:
        hosts: the test hosts (``netns.Host``).
        state_dir: folder for the config, logs and state.
    """

    def __init__(self, hosts: list, state_dir: Path) -> None:
        self.hosts, self.dir = hosts, Path(state_dir)
        self.nodes = [f"n{i}" for i in range(len(hosts))]
        self.env = {"SLURM_CONF": str(self.dir / "slurm.conf")}

    def cmd(self, args: list[str], host: int = 0) -> list[str]:
        """``args`` run on a host, inside its node's UTS/mount namespaces' view of the net."""
        return ["nsenter", f"--net=/run/netns/{self.hosts[host].name}", *args]

    def _daemon(self, host: int, args: list[str]) -> None:
        script = (f"mount --bind {self.dir / 'hosts'} /etc/hosts && hostname {self.nodes[host]} "
                  '&& exec "$@"')
        subprocess.run(self.cmd(["unshare", "--mount", "--uts", "sh", "-c", script, "sh", *args], host),
                       check=True, timeout=60, env={**os.environ, **self.env}, capture_output=True)

    def start(self) -> "TwoNodeCluster":
        if os.geteuid() != 0:
            pytest.skip("a two-node SLURM cluster needs root")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        # Packages and munged only; a munged this starts is stopped by stop() (its pid file is ours).
        result = subprocess.run(["bash", str(SETUP), "munge"], capture_output=True, text=True, timeout=900,
                                env={**os.environ, "CLICKTOWER_SLURM_DIR": str(self.dir)})
        if result.returncode != 0:
            pytest.fail(f"{SETUP} munge failed: {(result.stdout + result.stderr)[-2000:]}")
        (self.dir / "ctld").mkdir(exist_ok=True)
        (self.dir / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
            f"{h.address} {n}\n" for h, n in zip(self.hosts, self.nodes)))
        lines = "\n".join(f"NodeName={n} NodeAddr={h.address} CPUs={os.cpu_count()} RealMemory=2000 State=UNKNOWN"
                          for h, n in zip(self.hosts, self.nodes))
        (self.dir / "slurm.conf").write_text(TWO_NODE_CONF.format(
            dir=self.dir, nodes=self.nodes, addrs=[h.address for h in self.hosts], node_lines=lines,
            node_list=",".join(self.nodes)))
        conf = str(self.dir / "slurm.conf")
        self._daemon(0, ["/usr/sbin/slurmctld", "-i", "-f", conf])
        for i, node in enumerate(self.nodes):
            self._daemon(i, ["/usr/sbin/slurmd", "-N", node, "-f", conf])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            result = subprocess.run(self.cmd(["sinfo", "-h", "-N", "-o", "%N %T"]), capture_output=True, text=True,
                                    timeout=30, env={**os.environ, **self.env})
            states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
            if sorted(n for n, s in states.items() if s.startswith("idle")) == self.nodes:
                return self
            time.sleep(0.5)
        logs = "".join(p.read_text()[-800:] for p in sorted(self.dir.glob("*.log")))
        raise RuntimeError(f"two-node cluster not idle after 60 s: {result.stdout} {result.stderr}\n{logs}")

    def stop(self) -> None:
        """Kill the daemons and any job left (everything on the test hosts); stop munged if
        start() began it."""
        for host in self.hosts:
            host.kill_all()  # the test hosts run nothing but this cluster and its jobs
        subprocess.run(["bash", str(SETUP), "stop"], capture_output=True, timeout=120,
                       env={**os.environ, "CLICKTOWER_SLURM_DIR": str(self.dir)})

    def __enter__(self) -> "TwoNodeCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
