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
