"""Benchmark: how long a checkpoint save stalls training, synchronous vs ``checkpoint.async_save``,
for a BERT-base two-tower model (shared towers, random init, fp32) under DeepSpeed ZeRO-2 on
2 CPU ranks (gloo, ``configs/accelerate/cpu_2proc_zero2.yaml``).

    .venv/bin/python benchmarks/bench_checkpoint.py            # ~10 min on 2 loaded cores
    .venv/bin/python benchmarks/bench_checkpoint.py --quick    # tiny BERT, smoke run

Each mode is one real ``clicktower.launcher.train`` run (``train.max_steps=6``,
``checkpoint.every_steps=2``: saves at steps 2, 4 and 6, ``keep_last=1``), launched like the
documented ``accelerate launch`` commands, in alternating order over ``--rounds`` rounds. A
benchmark-side wrapper in each rank (``--worker``, this file; shipped code has no timing
hook) times, on the training thread, every call of the checkpointer (``save``, ``poll``,
``wait``, ``finish``): the STALL of a save is the time the training thread spends in them for
that save (sync: capture + write + hash + gather + commit; async: the capture with its copy
to host memory, the small files, and the commit at a later step boundary, plus any wait for
a save still in flight); the background thread's write+hash time is recorded too. Reported
per save: the slower rank's stall (the other waits for it at the next collective). The load
average before each run is recorded: the machine is shared, so absolute times vary.

Writes benchmarks/results/bench_checkpoint.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from common import machine, write_results  # benchmarks/common.py (run as a script: its folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BERT_BASE = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "max_position_embeddings": 512,
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
TINY = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64}


# -- inside each rank ---------------------------------------------------------------------

def worker(out: str, argv: list[str]) -> None:
    """Run ``clicktower.launcher.train`` with the checkpointer's training-thread calls timed.

    Args:
        out: JSON file for this rank's timings (``{rank}`` replaced).
        argv: the train command's arguments.
    """
    from clicktower.launcher.commands.train import main
    from clicktower.launcher.engine.checkpoint import Checkpointer, Snapshot

    calls: list[dict] = []
    writes: list[dict] = []
    depth = [0]  # save() calls wait(), finish() and poll() too: only outermost calls are stalls

    def timed(name, real):
        def wrapper(self, *args, **kwargs):
            pending = self.pending.step if self.pending is not None else None
            start, depth[0] = time.perf_counter(), depth[0] + 1
            try:
                return real(self, *args, **kwargs)
            finally:
                depth[0] -= 1
                calls.append({"call": name, "arg": args[0] if args and isinstance(args[0], int) else None,
                              "pending": pending, "s": time.perf_counter() - start, "nested": depth[0] > 0})
        return wrapper

    for name in ("save", "poll", "wait", "finish"):
        setattr(Checkpointer, name, timed(name, getattr(Checkpointer, name)))
    real_write = Snapshot.write

    def write(self):
        start = time.perf_counter()
        digests = real_write(self)
        writes.append({"folder": self.folder.name, "s": time.perf_counter() - start,
                       "bytes": sum(int(d["bytes"]) for d in digests.values())})
        return digests

    Snapshot.write = write
    code = 0
    try:
        code = main(argv)
    finally:
        rank = os.environ.get("RANK", "0")
        Path(out.replace("{rank}", rank)).write_text(json.dumps({"calls": calls, "writes": writes}))
    sys.exit(code)


def stalls(calls: list[dict]) -> dict[int, dict[str, float]]:
    """Training-thread seconds spent for each save, by step: ``capture`` (its ``save`` call,
    less the wait inside it for the previous save) and ``commit`` (the ``poll``, ``wait`` or
    ``finish`` calls made while it was in flight, the wait inside the next ``save`` included;
    a poll that finds the write still running costs one tiny all-reduce, counted too).

    Args:
        calls: one rank's timed calls, in completion order (a nested call before its caller).
    """
    out: dict[int, dict[str, float]] = {}
    inner = 0.0  # time of nested waits since the last outermost call: part of their caller
    for c in calls:
        if c["nested"]:
            if c["call"] == "wait" and c["pending"] is not None:
                entry = out.setdefault(c["pending"], {"capture": 0.0, "commit": 0.0})
                entry["commit"] += c["s"]
            inner += c["s"] if c["call"] == "wait" else 0.0
            continue
        if c["call"] == "save":
            entry = out.setdefault(c["arg"], {"capture": 0.0, "commit": 0.0})
            entry["capture"] += c["s"] - inner
        elif c["pending"] is not None:  # an outermost poll/wait/finish: the save in flight's
            entry = out.setdefault(c["pending"], {"capture": 0.0, "commit": 0.0})
            entry["commit"] += c["s"] - inner  # its nested wait is counted above
        inner = 0.0
    return out


# -- the launcher side ----------------------------------------------------------------------

def _prepare(work: Path) -> Path:
    from clicktower.data.shards import write_shards
    from clicktower.data.sources import FieldMap
    from clicktower.data.synth import generate

    generate(work / "synth", 2000, seed=1)
    write_shards([str(work / "synth" / "train.jsonl")], str(work / "shards"), FieldMap(), shard_size=500)
    return work / "shards"


def run_mode(mode: str, shards: Path, work: Path, bert: dict, batch: int) -> dict:
    """One training run; returns its per-save stalls (slower rank) and write times."""
    out = work / f"run_{mode}"
    shutil.rmtree(out, ignore_errors=True)
    timings = work / f"timings_{mode}_{{rank}}.json"
    args = ["--config", str(REPO / "configs" / "tiny.yaml"), f"data.train_manifest={shards}",
            f"train.output_dir={out}", "train.max_steps=6", "train.log_every_steps=1", "train.progress_bar=false",
            f"train.batch_size={batch}", "train.resume=none", f"model.bert_config={json.dumps(bert)}",
            "checkpoint.every_steps=2", "checkpoint.keep_last=1", f"checkpoint.async_save={mode == 'async'}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("ACCELERATE_USE_CPU", None)  # it would make accelerate drop DeepSpeed
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "cpu_2proc_zero2.yaml"), "--main_process_port", str(_port()),
           str(Path(__file__).resolve()), "--worker", str(timings), "--", *args]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{result.stderr[-3000:]}")
    ranks = [json.loads(Path(str(timings).replace("{rank}", str(r))).read_text()) for r in (0, 1)]
    per_rank = [stalls(r["calls"]) for r in ranks]
    steps = sorted(per_rank[0])
    total = [{k: v["capture"] + v["commit"] for k, v in r.items()} for r in per_rank]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"mode": mode, "load_1min_before": round(load, 2), "wall_s": round(wall, 1),
            "stall_s": {str(s): round(max(r[s] for r in total), 3) for s in steps},
            "capture_s": {str(s): round(max(r[s]["capture"] for r in per_rank), 3) for s in steps},
            "write_s": {w["folder"]: round(max(x["s"] for r in ranks for x in r["writes"]
                                               if x["folder"] == w["folder"]), 3) for w in ranks[0]["writes"]},
            "checkpoint_bytes": sum(w["bytes"] for r in ranks for w in r["writes"]) // max(1, len(steps)),
            "loss_step6": metrics[-1]["loss"]}


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def _markdown(report: dict) -> str:
    m, rows = report["machine"], report["runs"]
    lines = [f"# Checkpoint save stall: sync vs async ({report['model']}, ZeRO-2, 2 CPU ranks)", "",
             f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['mem_gib']} GiB, no GPU), shared with "
             "other jobs (1-minute load average before each run below), Python "
             f"{m['python']}, torch {m['torch']}. Command: `{report['command']}`.", "",
             f"Checkpoint size: {rows[0]['checkpoint_bytes'] / 2**30:.2f} GiB per save (both ranks' files). "
             "Stall: seconds the training thread spends on a save (slower rank); write: the background "
             "thread's write + hash time (async) or the write inside the stall (sync).", "",
             "Each cell: stall (of which capture: the `save` call itself, the rest is the commit and any "
             "wait for the write).", "",
             "| round | mode | load before | step 2 | step 4 | step 6 | write (max) | run wall |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        st, cap = row["stall_s"], row["capture_s"]
        cells = [f"{st[k]:.2f} ({cap[k]:.2f})" if k in st else "-" for k in ("2", "4", "6")]
        lines.append(f"| {row['round']} | {row['mode']} | {row['load_1min_before']} | {' | '.join(cells)} | "
                     f"{max(row['write_s'].values()):.2f} | {row['wall_s']} |")
    summary = report["summary"]
    lines += ["", f"Median stall per save: sync {summary['sync_median_stall_s']} s, async "
              f"{summary['async_median_stall_s']} s ({summary['ratio']}x less; the async capture alone: "
              f"{summary['async_median_capture_s']} s). Losses at step 6 equal between modes: "
              f"{summary['same_loss']}.", "",
              "Async: the capture is the copy of the state to host memory (here: CPU tensors cloned) and "
              "the small files (RNG, scheduler, trainer state); the commit (digests gathered, marker, "
              "rename) runs at the first step boundary where every rank's write is done, or, when the write "
              "is still running, inside the next save or at the end of the run, waiting for it: that wait is "
              "counted for the save being committed. Sync: the capture includes the write and hashing, the "
              "commit is the gather, marker and rename. On a GPU the copy is a device-to-host transfer "
              "(not pinned memory)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny BERT (smoke run)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="pairs per rank per step")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        worker(args.worker, [a for a in rest if a != "--"])
        return
    bert, model = (TINY, "tiny BERT") if args.quick else (BERT_BASE, "BERT-base")
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        work = Path(tmp)
        shards = _prepare(work)
        for round_ in range(args.rounds):
            order = ("sync", "async") if round_ % 2 == 0 else ("async", "sync")
            for mode in order:
                row = run_mode(mode, shards, work, bert, args.batch)
                row["round"] = round_ + 1
                runs.append(row)
                print(json.dumps(row), flush=True)
    med = {mode: statistics.median(v for r in runs if r["mode"] == mode for v in r["stall_s"].values())
           for mode in ("sync", "async")}
    med_capture = statistics.median(v for r in runs if r["mode"] == "async" for v in r["capture_s"].values())
    report = {"model": model, "machine": machine(), "runs": runs,
              "command": "python benchmarks/bench_checkpoint.py" + (" --quick" if args.quick else ""),
              "summary": {"sync_median_stall_s": round(med["sync"], 3), "async_median_stall_s": round(med["async"], 3),
                          "async_median_capture_s": round(med_capture, 3),
                          "ratio": round(med["sync"] / max(med["async"], 1e-9), 1),
                          "same_loss": len({r["loss_step6"] for r in runs}) == 1}}
    write_results("bench_checkpoint_quick" if args.quick else "bench_checkpoint", report, _markdown(report))


if __name__ == "__main__":
    main()
