"""Run a function on N local gloo ranks (torch.multiprocessing spawn) and collect results.

Used by the distributed tests: ``run_ranks(fn, world, *args)`` returns ``[fn(rank, world, *args)
for each rank]``. ``fn`` must be importable (defined at module level of a test helper).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from procs import descendants, free_port, kill_tree  # noqa: F401  (re-exported for the tests)


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # 2 ranks on a shared 2-core machine
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        # No rank tears its gloo pairs down while the peer may still be completing the last
        # collective. (Seen once in CI: a rank aborted with "terminate called without an
        # active exception", SIGABRT, and no Python error; where it died is not known.)
        dist.barrier()
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
            saved = all((Path(out_dir) / f"rank{r}.pt").is_file() for r in range(world))
            if errors or not saved or isinstance(exc, TimeoutError):
                raise RuntimeError(f"a rank failed:\n{errors}") from exc
            # Every rank saved its result and none raised: a process died after the work under
            # test (in the final barrier or gloo's teardown). Say so, don't fail.
            warnings.warn(f"a rank died after saving its result (teardown): {exc}")
        finally:  # also on a per-test timeout (pytest-timeout): no rank outlives the test
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def worker_pid(root: int, rank: int) -> int | None:
    """The training worker of ``rank`` below a launcher (torchrun, accelerate launch), found by
    the ``RANK`` the launcher put in its environment; None while it is not started.

    Args:
        root: the launcher's process id.
        rank: the global rank.
    """
    for pid in descendants(root):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"clicktower.launcher.train" in cmdline:
            return pid
    return None


def consumed_keys(out: Path) -> dict[tuple[int, int], tuple[list[int], list[str]]]:
    """What every rank trained on, from the trainer's ``train.sample_keys_log=true`` files.

    Args:
        out: the run's output folder.

    Returns:
        ``{(rank, step): (epoch of each key, sample keys)}``; a step logged twice (before a kill and again
        after the resume) keeps its last record, the one the finished run's weights depend on.
    """
    records = {}
    for rank, steps in logged_steps(out).items():
        for step, epochs, keys in steps:
            records[(rank, step)] = (epochs, keys)
    return records


def logged_steps(out: Path) -> dict[int, list[tuple[int, list[int], list[str]]]]:
    """Every rank's sample-keys records in file order: ``{rank: [(step, epochs, keys), ...]}``
    (``epochs[i]`` is the loader epoch ``keys[i]`` came from)."""
    files = sorted((out / "sample_keys").glob("rank_*.jsonl"))
    assert files, f"no sample keys logged under {out} (train.sample_keys_log=true?)"
    result = {}
    for path in files:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        result[int(path.stem.split("_")[1])] = [(r["step"], r["epochs"], r["keys"]) for r in lines]
    return result


def keys_per_step(records: dict[tuple[int, int], tuple[list[int], list[str]]]) -> dict[int, set[str]]:
    """The global batch's keys (all ranks together) at each step."""
    steps: dict[int, set[str]] = {}
    for (_, step), (_, keys) in records.items():
        steps.setdefault(step, set()).update(keys)
    return steps


def assert_exactly_once(records: dict[tuple[int, int], tuple[list[int], list[str]]], steps: int,
                        global_batch: int) -> None:
    """Steps 1..``steps`` all logged, ``global_batch`` keys each, and no key twice in an epoch."""
    assert sorted({step for _, step in records}) == list(range(1, steps + 1))
    by_epoch: dict[int, list[str]] = {}
    for epochs, keys in records.values():
        # Per key: with gradient accumulation one step can straddle an epoch end.
        for epoch, key in zip(epochs, keys, strict=True):
            by_epoch.setdefault(epoch, []).append(key)
    assert sum(map(len, by_epoch.values())) == steps * global_batch
    for epoch, keys in by_epoch.items():
        repeated = sorted(k for k, n in Counter(keys).items() if n > 1)
        assert not repeated, f"epoch {epoch}: keys consumed twice: {repeated[:5]}"
