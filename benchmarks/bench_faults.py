"""Training under storage faults: faults injected, retries counted, pairs lost (issue 26).

    .venv/bin/python benchmarks/bench_faults.py            # ~10 min on 2 loaded cores

``clicktower train`` on 2 CPU ranks (the tiny model of configs/tiny.yaml, gloo) reads its
shards from moto's S3 server on 127.0.0.1 through the fault proxy of the tests
(tests/support/faultproxy.py: dropped connections, 500, 503 SlowDown, stalls past the client's
2 s read timeout, truncated bodies, at a seeded rate). The runs are tests/test_faults.py's
(tests/support/fault_runs.py), on more data and more seeds:

* ``data``: one run with ``data.cache_dir``;
* ``killed``: ``checkpoint.remote_dir`` on the same proxy and ``checkpoint.async_save``,
  SIGKILLed during a local save and during an upload (seeded steps), resumed from the bucket
  on an empty disk each time.

Baseline: the same training from the local shards, no proxy, no checkpoints; every run's
losses are compared with it step by step. Writes results/faults.json and results/faults.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from common import machine  # benchmarks/common.py (run as a script: its folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))
RESULTS = REPO / "benchmarks" / "results"
BUCKET = "faults"
STALL_S = 4.0




def _shards(root: Path, pairs: int) -> tuple[Path, set[str]]:
    """``pairs`` synthetic pairs as local shards of 100, and their keys."""
    from clicktower.data.loader import ClickPairLoader, DataConfig, Rank
    from clicktower.data.shards import write_shards
    from clicktower.data.sources import FieldMap
    from clicktower.data.synth import generate

    generate(root / "synth", 2000, seed=1)
    lines = (root / "synth" / "train.jsonl").read_text("utf-8").splitlines(keepends=True)[:pairs]
    (root / "train.jsonl").write_text("".join(lines), "utf-8")
    write_shards([str(root / "train.jsonl")], str(root / "shards"), FieldMap(), shard_size=100)
    keys = {k for b in ClickPairLoader(DataConfig(num_workers=0), str(root / "shards"), 32, Rank(0, 1), 0)
            for k in b.keys}
    return root / "shards", keys


def _row(kind: str, seed: int, rate: float, proxy, result: dict, proved: dict, wall: float, load: float) -> dict:
    return {"run": kind, "seed": seed, "rate": rate, "load_1min_before": round(load, 2), "wall_s": round(wall, 1),
            "requests": proxy.requests, "faults": proxy.counts.total(),
            "faults_by_kind": {k: proxy.counts.get(k, 0) for k in ("drop", "500", "503", "stall", "truncate")},
            "retries_logged": result["retries"], "processes_started": len(result["attempts"]),
            "sigkills": result["sigkills"], "kill_points": result.get("kill_points"),
            "resumed_at": result["resumed"], "expected_resumes": result.get("expected_resumes", []), **proved}


def run(pairs: int, data_seeds: list[int], killed_seeds: list[int], data_rate: float, killed_rate: float) -> dict:
    from fault_runs import Scenario, check, data_run, killed_run, launch
    from faultproxy import FaultProxy
    from store_servers import S3_ENV, make_bucket, moto_s3

    from clicktower.data.storage import Storage

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_faults_") as tmp, moto_s3() as (endpoint, _):
        root = Path(tmp)
        os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": endpoint})
        make_bucket(endpoint, BUCKET)
        local, keys = _shards(root / "data", pairs)
        for path in sorted(local.iterdir()):
            Storage().put_file(str(path), f"s3://{BUCKET}/shards/{path.name}")
        remote = Scenario(f"s3://{BUCKET}/shards", pairs=pairs)
        t = time.perf_counter()
        launch(Scenario(str(local), pairs=pairs).args(root / "ref" / "run"), {}, root / "ref.log")
        reference = {"run": "fault-free baseline (local shards)", "wall_s": round(time.perf_counter() - t, 1)}
        plan = [("data", s, data_rate) for s in data_seeds] + [("killed", s, killed_rate) for s in killed_seeds]
        for kind, seed, rate in plan:
            where = root / f"{kind}_{seed}"
            where.mkdir()
            load, t = os.getloadavg()[0], time.perf_counter()
            with FaultProxy(endpoint, rate=rate, seed=seed, stall_s=STALL_S) as proxy:
                if kind == "data":
                    result = data_run(remote, proxy, where)
                else:
                    result = killed_run(remote, proxy, where, f"s3://{BUCKET}/{kind}_{seed}", seed)
            wall = time.perf_counter() - t
            proved = check(result, root / "ref" / "run", keys, remote)
            rows.append(_row(kind, seed, rate, proxy, result, proved, wall, load))
            print(json.dumps(rows[-1]), flush=True)
    return {"machine": machine(), "pairs": pairs, "epochs": remote.epochs, "steps": remote.steps,
            "ranks": 2, "batch_per_rank": remote.batch, "stall_s": STALL_S, "client_read_timeout_s": remote.timeout_s,
            "baseline": reference, "runs": rows,
            "totals": {"runs": len(rows), "processes_started": sum(r["processes_started"] for r in rows),
                       "sigkills": sum(r["sigkills"] for r in rows), "faults": sum(r["faults"] for r in rows),
                       "retries_logged": sum(sum(r["retries_logged"].values()) for r in rows),
                       "pairs_lost": sum(r["pairs_lost"] for r in rows),
                       "pairs_duplicated": sum(r["pairs_duplicated"] for r in rows),
                       "all_losses_equal_fault_free": all(r["losses_equal_fault_free"] for r in rows)}}


def _markdown(report: dict) -> str:
    m, t = report["machine"], report["totals"]
    lines = [
        "# Training under storage faults (2 CPU ranks, tiny model, moto S3 behind a fault proxy)", "",
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['mem_gib']} GiB, no GPU), shared with other "
        f"jobs (1-minute load average before each run below), Python {m['python']}, torch {m['torch']}. "
        "Command: `python benchmarks/bench_faults.py`.", "",
        f"Each run: `clicktower train` on 2 ranks (`accelerate launch`, gloo), configs/tiny.yaml, {report['pairs']} "
        f"pairs x {report['epochs']} epochs ({report['steps']} steps of 2 x {report['batch_per_rank']}), shards read "
        "from moto's S3 server on 127.0.0.1 through tests/support/faultproxy.py: each request faulted at the rate "
        "below (seeded), the fault drawn among a dropped connection, 500, 503 SlowDown, a stall of "
        f"{report['stall_s']:.0f} s (the client's read timeout: {report['client_read_timeout_s']:.0f} s) and a "
        "truncated body; at most 2 faults in a row per request. `data`: `data.cache_dir`. `killed`: also "
        "`checkpoint.remote_dir` on the same proxy and `checkpoint.async_save`, every 4 steps, SIGKILLed during the "
        "async write of a local save and during an upload (its COMPLETE marker held at the proxy), each time resumed "
        "from the bucket on an empty disk. Baseline: the same training from local shards, no proxy, no checkpoints "
        f"({report['baseline']['wall_s']} s).", "",
        "| run | seed | rate | load before | wall s | requests | faults | drop / 500 / 503 / stall / truncate | "
        "retries logged (data, remote) | processes | SIGKILLs | resumed at (expected) | pairs lost | duplicated | "
        "losses = baseline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        kinds = " / ".join(str(v) for v in r["faults_by_kind"].values())
        resumed = ", ".join(map(str, r["resumed_at"])) or "-"
        expected = ", ".join(map(str, r["expected_resumes"])) or "-"
        lines.append(f"| {r['run']} | {r['seed']} | {r['rate']} | {r['load_1min_before']} | {r['wall_s']} | "
                     f"{r['requests']} | {r['faults']} | {kinds} | {r['retries_logged']['data']}, "
                     f"{r['retries_logged']['remote']} | {r['processes_started']} | {r['sigkills']} | "
                     f"{resumed} ({expected}) | {r['pairs_lost']} | {r['pairs_duplicated']} | "
                     f"{r['losses_equal_fault_free']} |")
    lines += [
        "", f"Totals: {t['runs']} runs, {t['processes_started']} training launches, {t['sigkills']} SIGKILLs, "
        f"{t['faults']} faults injected, {t['retries_logged']} retries in metrics.jsonl, pairs lost "
        f"{t['pairs_lost']}, pairs duplicated {t['pairs_duplicated']}, every run's losses equal to the "
        f"baseline at every step it logged: {t['all_losses_equal_fault_free']}.", "",
        "Pairs lost / duplicated: per epoch, the keys in no step's record / in more than one, over all attempts of a "
        "run (a step logged again after a resume keeps its last record). Retries logged: the last metrics.jsonl "
        "line of each attempt (counts since that start: `data_retries_all_ranks`, both ranks' reads, and "
        "`remote_retries`, rank 0's uploads and downloads), summed over the attempts. Faults that cost no "
        "clicktower retry, so retries are fewer than faults: a dropped idempotent request is re-sent once by aiohttp itself (it cannot tell it from "
        "a server closing an idle keep-alive connection); a failed HEAD makes s3fs answer `info` from a listing; "
        "and faults in the attempts' last seconds before a SIGKILL, whose counts were not logged yet. Where clicktower loses: every stall costs the client's read timeout (2 s "
        "here, botocore's default is 60 s) and every retry its backoff, so a faulted run is slower than the "
        "baseline (wall s above, which also includes the kills and the restarts).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=640)
    parser.add_argument("--data-seeds", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--killed-seeds", type=int, nargs="*", default=[3, 4])
    parser.add_argument("--data-rate", type=float, default=0.3)
    parser.add_argument("--killed-rate", type=float, default=0.15)
    args = parser.parse_args()
    report = run(args.pairs, args.data_seeds, args.killed_seeds, args.data_rate, args.killed_rate)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "faults.md").write_text(_markdown(report))
    print(_markdown(report))
    totals = report["totals"]
    if totals["pairs_lost"] or totals["pairs_duplicated"] or not totals["all_losses_equal_fault_free"]:
        sys.exit("a run lost or repeated pairs, or its losses differ from the baseline")


if __name__ == "__main__":
    main()
