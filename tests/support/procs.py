"""Processes the tests start: free ports, process trees, and killing a whole tree.

Light on purpose (no torch): ``tests/conftest.py`` imports it for every launched command.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (children, grandchildren, ...), from /proc.

    Args:
        root: a process id.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    pids, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            pids.append(child)
            stack.append(child)
    return pids


def kill_tree(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILL a process and everything below it (torch-elastic's workers have their own
    process groups, so the launcher's group alone would leave them behind).

    Args:
        proc: the launcher process.
        timeout: seconds to wait for it to be reaped.
    """
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=timeout)
