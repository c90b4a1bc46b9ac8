"""Run a function on N local gloo ranks (torch.multiprocessing spawn) and collect results.

Used by the distributed tests: ``run_ranks(fn, world, *args)`` returns ``[fn(rank, world, *args)
for each rank]``. ``fn`` must be importable (defined at module level of a test helper).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # 2 ranks on a shared 2-core machine
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 120.0) -> list:
    """Spawn ``world`` gloo processes running ``fn(rank, world, *args)``; return their results."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_entry, args=(world, free_port(), out_dir, fn, args), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for proc in ctx.processes:
                        proc.kill()
                    raise TimeoutError(f"ranks still running after {timeout} s (a collective hung?)")
        except Exception as exc:
            errors = "\n".join(p.read_text() for p in sorted(Path(out_dir).glob("*.err")))
            raise RuntimeError(f"a rank failed:\n{errors}") from exc
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def kill_tree(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILL a process and everything below it (torch-elastic's workers have their own
    process groups, so the launcher's group alone would leave them behind).

    Args:
        proc: the launcher process.
        timeout: seconds to wait for it to be reaped.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    pids, stack = [proc.pid], [proc.pid]
    while stack:
        for child in children.get(stack.pop(), []):
            pids.append(child)
            stack.append(child)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=timeout)
