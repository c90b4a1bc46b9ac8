"""Training runs under storage faults, for tests/test_faults.py and benchmarks/bench_faults.py.

``clicktower train`` on 2 CPU ranks (``accelerate launch``, gloo) reads its shards from moto's
S3 server through a ``FaultProxy`` (faultproxy.py). ``data_run`` trains once with
``data.cache_dir``; ``killed_run`` adds ``checkpoint.remote_dir`` (the same proxy) and
``checkpoint.async_save``, SIGKILLs the run while the async write of a checkpoint is held (the
hold_save helper), resumes it on an empty disk, SIGKILLs it while the upload of a later
checkpoint's ``COMPLETE`` marker is held at the proxy, and resumes it on an empty disk again
to the end. Both return what a check needs: every attempt's metrics and sample keys, the
resume lines, the pairs lost and duplicated per epoch, the retries ``metrics.jsonl`` counted.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from faultproxy import FaultProxy, wait_until
from hold_save.sitecustomize import hold_env
from procs import free_port, kill_tree

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class Scenario:
    """One training set-up (the tests' by default: 320 pairs, 2 epochs, 2 ranks x 16)."""

    manifest: str          # the shard folder or URL
    pairs: int = 320
    epochs: int = 2
    batch: int = 16        # per rank; 2 ranks
    every: int = 4         # checkpoint.every_steps
    timeout_s: float = 2   # the client's connect and read timeouts (below the proxy's stall)
    extra: tuple[str, ...] = ()

    @property
    def steps(self) -> int:
        return self.epochs * (self.pairs // (2 * self.batch))

    def args(self, out: Path, *more: str) -> list[str]:
        return ["--config", str(REPO / "configs" / "tiny.yaml"), f"data.train_manifest={self.manifest}",
                f"train.output_dir={out}", "train.max_steps=null", f"train.epochs={self.epochs}",
                f"train.batch_size={self.batch}", "train.log_every_steps=1", "train.progress_bar=false",
                "train.sample_keys_log=true", *self.extra, *more]

    def storage_options(self) -> str:
        t = self.timeout_s
        return f"{{config_kwargs: {{connect_timeout: {t}, read_timeout: {t}}}}}"


def launch_cmd(args: list[str], env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """``accelerate launch`` of ``clicktower.launcher.train`` on 2 CPU processes, on a free port."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "ACCELERATE_USE_CPU": "true", **(env or {})}
    full["PATH"] = f"{BIN}{os.pathsep}{full.get('PATH', '')}"
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "configs" / "accelerate" /
                                                                   "cpu_2proc_ddp.yaml"),
           "--main_process_port", str(free_port()), "-m", "clicktower.launcher.train", *args]
    return cmd, full


def launch(args: list[str], env: dict[str, str], log: Path, timeout: float = 600) -> str:
    """Run to the end (the output in ``log``); returns the output; raises on failure."""
    cmd, full = launch_cmd(args, env)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full, stdout=fh, stderr=subprocess.STDOUT)
    try:
        code = proc.wait(timeout=timeout)
    except BaseException:
        kill_tree(proc, timeout=30)
        raise
    text = log.read_text()
    if code != 0:
        raise RuntimeError(f"training failed ({code}):\n{text[-4000:]}")
    return text


def kill_when(args: list[str], env: dict[str, str], log: Path, reached, what: str) -> str:
    """Launch, wait until ``reached()``, SIGKILL the whole process tree; returns the output."""
    cmd, full = launch_cmd(args, env)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full, stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: reached() or proc.poll() is not None, 600, what)
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before {what}:\n{log.read_text()[-4000:]}")
    finally:
        kill_tree(proc, timeout=30)
    return log.read_text()


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def losses(folder: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(folder) if "loss" in r}


def sample_keys(folder: Path) -> dict[tuple[int, int], tuple[list[int], list[str]]]:
    """``{(rank, step): (epochs, keys)}``; a step logged twice keeps its last record."""
    out = {}
    for path in sorted((folder / "sample_keys").glob("rank_*.jsonl")):
        rank = int(path.stem.split("_")[1])
        for line in path.read_text().splitlines():
            record = json.loads(line)
            out[(rank, record["step"])] = (record["epochs"], record["keys"])
    return out


def pair_counts(records: dict, all_keys: set[str], epochs: int) -> dict[str, int]:
    """Pairs lost (never trained in an epoch) and duplicated (trained twice in one), summed
    over the epochs."""
    per_epoch = {e: Counter() for e in range(epochs)}
    for eps, keys in records.values():
        for epoch, key in zip(eps, keys, strict=True):
            per_epoch.setdefault(epoch, Counter())[key] += 1
    lost = sum(len(all_keys - set(c)) for c in per_epoch.values())
    duplicated = sum(n - 1 for c in per_epoch.values() for n in c.values() if n > 1)
    return {"pairs_lost": lost, "pairs_duplicated": duplicated, "epochs_seen": len(per_epoch)}


def keep(out: Path, attempts: list[Path]) -> None:
    """Move what an attempt logged aside (metrics, sample keys) and delete the rest: the next
    attempt starts on an empty disk."""
    kept = out.parent / f"attempt_{len(attempts)}"
    kept.mkdir()
    for name in ("metrics.jsonl", "sample_keys"):
        if (out / name).exists():
            shutil.move(str(out / name), str(kept / name))
    attempts.append(kept)
    shutil.rmtree(out)


def retries_logged(folder: Path) -> dict[str, int]:
    """The retries one attempt's ``metrics.jsonl`` counted (its last line: the counts since
    that start): reads on every rank, checkpoint uploads and downloads (rank 0)."""
    last = metrics(folder)[-1]
    return {"data": last["data_retries_all_ranks"], "remote": last.get("remote_retries", 0)}


def data_run(scn: Scenario, proxy: FaultProxy, root: Path) -> dict:
    """One training run reading through ``proxy`` with ``data.cache_dir``."""
    out = root / "run"
    args = scn.args(out, f"data.cache_dir={root / 'node_cache'}", f"data.storage_options={scn.storage_options()}")
    launch(args, {"AWS_ENDPOINT_URL": proxy.url}, root / "run.log")
    return {"attempts": [out], "retries": retries_logged(out), "sigkills": 0, "resumed": []}


def kill_points(seed: int, scn: Scenario) -> tuple[int, int]:
    """The steps whose local save, then whose upload, is SIGKILLed: seeded, the first in the
    first half of the run (not the first checkpoint), the second after it."""
    rng = random.Random(seed)
    saves = list(range(2 * scn.every, scn.steps, scn.every))
    save_kill = rng.choice(saves[: max(1, len(saves) // 2)])
    upload_kill = rng.choice([s for s in saves if s > save_kill] or [saves[-1]])
    return save_kill, upload_kill


def killed_run(scn: Scenario, proxy: FaultProxy, root: Path, url: str, seed: int) -> dict:
    """Training with remote async checkpoints through ``proxy``, SIGKILLed during a local save
    and during an upload, each time resumed from the bucket on an empty disk (module docstring)."""
    from clicktower.launcher.engine.checkpoint.remote import RemoteCheckpoints

    save_kill, upload_kill = kill_points(seed, scn)
    out = root / "run"
    args = scn.args(out, f"data.cache_dir={out / 'node_cache'}", f"data.storage_options={scn.storage_options()}",
                    f"checkpoint.every_steps={scn.every}", "checkpoint.keep_last=2", "checkpoint.async_save=true",
                    f"checkpoint.remote_dir={url}", f"checkpoint.storage_options={scn.storage_options()}")
    env = {"AWS_ENDPOINT_URL": proxy.url}
    bucket = RemoteCheckpoints(url, keep_last=2)   # this process: straight to the server
    attempts: list[Path] = []
    logs = []
    previous = f"step_{save_kill - scn.every:08d}"
    step_log = out / "sample_keys" / "rank_0.jsonl"

    def logged() -> int:
        return len(step_log.read_text().splitlines()) if step_log.is_file() else 0

    # 1. The async write of step save_kill held (training goes on), the previous one uploaded.
    logs.append(kill_when(args, hold_env(save_kill, env, "HOLD_WRITE_STEP"), root / "attempt_0.log",
                          lambda: logged() > save_kill and bucket.latest() == previous,
                          f"step {save_kill + 1} with {previous} uploaded"))
    local_save_unfinished = not (out / "checkpoints" / f"step_{save_kill:08d}").exists()
    keep(out, attempts)
    # 2. Empty disk: resumed from the bucket; killed while step upload_kill's marker is held.
    with proxy.hold("PUT", f"/checkpoints/step_{upload_kill:08d}/COMPLETE") as marker:
        logs.append(kill_when(args, env, root / "attempt_1.log", marker.is_set,
                              f"the upload of step {upload_kill}'s marker"))
    partial = f"step_{upload_kill:08d}"
    upload_unfinished = partial in bucket.all_steps() and partial not in bucket.complete_steps()
    keep(out, attempts)
    # 3. Empty disk again: resumed from the newest complete checkpoint, to the end.
    logs.append(launch(args, env, root / "attempt_2.log"))
    keep(out, attempts)
    resumed = [line.split(" at step ")[-1] for text in logs for line in text.splitlines()
               if line.startswith("resumed from ")]
    return {"attempts": attempts, "sigkills": 2, "kill_points": {"local_save": save_kill, "upload": upload_kill},
            "resumed": [int(s) for s in resumed], "expected_resumes": [save_kill - scn.every, upload_kill - scn.every],
            "local_save_unfinished": local_save_unfinished, "upload_unfinished": upload_unfinished,
            "retries": {kind: sum(retries_logged(a)[kind] for a in attempts) for kind in ("data", "remote")},
            "remote_complete": bucket.complete_steps()}


def check(result: dict, reference: Path, all_keys: set[str], scn: Scenario) -> dict:
    """What a run proved: pairs lost and duplicated per epoch (the attempts' sample keys, a step
    logged again after a resume keeping its last record), and whether every attempt's losses
    equal the fault-free ``reference``'s at the same steps."""
    records: dict = {}
    for folder in result["attempts"]:
        records.update(sample_keys(folder))
    expected = losses(reference)
    same = all(losses(f) and losses(f) == {s: expected[s] for s in losses(f)} for f in result["attempts"])
    steps = sorted({step for _, step in records})
    return {**pair_counts(records, all_keys, scn.epochs), "losses_equal_fault_free": same,
            "steps_trained": steps == list(range(1, scn.steps + 1))}
