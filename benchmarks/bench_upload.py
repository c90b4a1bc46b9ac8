"""Benchmark: how much remote checkpoint uploads (``checkpoint.remote_dir``) stall training steps.

    .venv/bin/python benchmarks/bench_upload.py            # ~5 min on 2 loaded cores
    .venv/bin/python benchmarks/bench_upload.py --quick    # smoke run

One process trains a small two-tower BERT (random init, fp32, ``clicktower.launcher.train``'s
own ``main``) for ``--steps`` steps with a checkpoint every ``--every`` steps, in three modes,
alternating over ``--rounds`` rounds:

* ``off``: no ``remote_dir`` (the baseline);
* ``background``: ``remote_dir`` on moto's S3 server on 127.0.0.1 behind a TCP proxy that caps
  the upload bandwidth (``--mbps``), as shipped: a commit never waits for an upload;
* ``blocking``: the same, with the pre-fix policy emulated by a benchmark-side wrapper (each
  new upload first waits for the previous one, which is what the commit did before).

A benchmark-side wrapper (``--worker``, this file; shipped code has no timing hook) records, on
the training thread, the time of every checkpointer call (``save``, ``poll``, ``finish``): the
STALL is the training thread's time in ``save`` and ``poll`` (writing the local checkpoint is in
every mode; what differs is the wait for uploads). ``finish`` (end of run: the last uploads
waited for) is reported apart, and so is the run's wall time.

Writes benchmarks/results/bench_upload.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from common import machine, write_results  # benchmarks/common.py (run as a script: its folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "tests" / "support"))  # store_servers: moto's S3 server on loopback
SMALL = {"vocab_size": 30522, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 512, "max_position_embeddings": 64,
         "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
BUCKET = "bench"


# -- inside the training process -------------------------------------------------------------

def worker(out: str, mode: str, argv: list[str]) -> None:
    """Run ``clicktower.launcher.train``'s main with the checkpointer's calls timed.

    Args:
        out: JSON file for the timings.
        mode: ``off``, ``background`` or ``blocking`` (the pre-fix policy, emulated here).
        argv: the train command's arguments.
    """
    from clicktower.launcher.commands.train import main
    from clicktower.launcher.engine.checkpoint import Checkpointer
    from clicktower.launcher.engine.checkpoint.remote import RemoteCheckpoints

    calls: list[dict] = []

    def timed(name, real):
        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return real(self, *args, **kwargs)
            finally:
                calls.append({"call": name, "at": start, "s": time.perf_counter() - start})
        return wrapper

    for name in ("save", "poll", "finish"):
        setattr(Checkpointer, name, timed(name, getattr(Checkpointer, name)))
    if mode == "blocking":
        real_upload = RemoteCheckpoints.upload_async

        def upload_after_the_previous(self, folder, best=None):
            self.wait()  # what the commit did before: wait for the upload in flight
            real_upload(self, folder, best)

        RemoteCheckpoints.upload_async = upload_after_the_previous
    code = 0
    try:
        code = main(argv)
    finally:
        Path(out).write_text(json.dumps({"calls": calls}))
    sys.exit(code)


# -- the bandwidth cap -----------------------------------------------------------------------

@contextmanager
def throttled(upstream: tuple[str, int], bytes_per_s: float):
    """A TCP proxy on 127.0.0.1 to ``upstream`` that forwards client bytes at ``bytes_per_s``
    (the upload direction; replies pass at once). Yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def pump(src: socket.socket, dst: socket.socket, rate: float | None) -> None:
        try:
            while data := src.recv(64 * 1024):
                if rate:
                    time.sleep(len(data) / rate)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            server = socket.create_connection(upstream)
            threading.Thread(target=pump, args=(client, server, bytes_per_s), daemon=True).start()
            threading.Thread(target=pump, args=(server, client, None), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


# -- the launcher side -----------------------------------------------------------------------

def _prepare(work: Path) -> Path:
    from clicktower.data.shards import write_shards
    from clicktower.data.sources import FieldMap
    from clicktower.data.synth import generate

    generate(work / "synth", 2000, seed=1)
    write_shards([str(work / "synth" / "train.jsonl")], str(work / "shards"), FieldMap(), shard_size=500)
    return work / "shards"


def run_mode(mode: str, shards: Path, work: Path, args: argparse.Namespace, env_s3: dict, tag: str) -> dict:
    """One training run in a fresh process; returns its stalls."""
    out = work / f"run_{mode}"
    shutil.rmtree(out, ignore_errors=True)
    timings = work / f"timings_{mode}.json"
    train = ["--config", str(REPO / "configs" / "tiny.yaml"), f"data.train_manifest={shards}",
             f"train.output_dir={out}", f"train.max_steps={args.steps}", "train.log_every_steps=1",
             "train.progress_bar=false", "train.batch_size=32", "train.resume=none",
             f"model.bert_config={json.dumps(SMALL)}", f"checkpoint.every_steps={args.every}",
             "checkpoint.keep_last=2"]
    if mode != "off":
        train.append(f"checkpoint.remote_dir=s3://{BUCKET}/{tag}-{mode}")
    env = {**os.environ, **env_s3, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "ACCELERATE_USE_CPU": "true"}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(timings), mode, "--",
                             *train], cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{result.stderr[-3000:]}")
    calls = json.loads(timings.read_text())["calls"]
    saves = [c["s"] for c in calls if c["call"] == "save"]
    polls = [c["s"] for c in calls if c["call"] == "poll"]
    finish = sum(c["s"] for c in calls if c["call"] == "finish")
    # poll runs first in every step's checkpoint observer: poll to poll is one step period,
    # and that period less the checkpointer's calls in it is the step itself.
    ticks = [c["at"] for c in calls if c["call"] == "poll"]
    spent = [sum(c["s"] for c in calls if c["call"] != "finish" and a <= c["at"] < b) for a, b in zip(ticks, ticks[1:])]
    steps = [b - a - x for a, b, x in zip(ticks, ticks[1:], spent)]
    size = sum(p.stat().st_size for p in (out / "checkpoints").glob("step_*/**/*") if p.is_file())
    folders = len(list((out / "checkpoints").glob("step_*")))
    line = next((x for x in result.stdout.splitlines() if x.startswith("checkpoint.remote_dir:")), "")
    return {"mode": mode, "load_1min_before": round(load, 2), "wall_s": round(wall, 1),
            "stall_s": round(sum(saves) + sum(polls), 2), "save_s": [round(s, 2) for s in saves],
            "save_max_s": round(max(saves), 2), "finish_s": round(finish, 2),
            "step_median_s": round(statistics.median(steps), 3), "loop_s": round(ticks[-1] - ticks[0], 2),
            "checkpoint_mb": round(size / max(1, folders) / 1e6, 1), "upload_line": line}


def _markdown(report: dict) -> str:
    m, runs = report["machine"], report["runs"]
    lines = [f"# Remote checkpoint uploads: stall of the training steps ({report['setup']})", "",
             f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, no GPU), shared with other jobs (1-minute "
             f"load average before each run below), Python {m['python']}, torch {m['torch']}. "
             f"Command: `{report['command']}`.", "",
             f"moto's S3 server on 127.0.0.1 behind a TCP proxy capping uploads at {report['mbps']} MB/s. "
             "Stall: the training thread's seconds in `Checkpointer.save` and `poll` over the run (the local "
             "save is in every mode); finish: the end of the run waiting for the last uploads.", "",
             "| round | mode | load before | stall (s) | slowest save (s) | step, median (s) | loop, step 1 to last (s) "
             "| finish (s) | run wall (s) | uploads |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['round']} | {r['mode']} | {r['load_1min_before']} | {r['stall_s']} | {r['save_max_s']} "
                     f"| {r['step_median_s']} | {r['loop_s']} | {r['finish_s']} | {r['wall_s']} "
                     f"| {r['upload_line'].split(': ', 1)[-1] or '-'} |")
    med = report["median"]
    lines += ["", "Step: one training step without the checkpointer's calls (poll to poll, less them); loop: the "
              "training loop from step 1 to the last step, stalls included.", "",
              "| mode (median of the rounds) | stall (s) | step (s) | loop (s) | finish (s) |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['stall_s']} | {v['step_median_s']} | {v['loop_s']} | {v['finish_s']} |" for k, v in med.items()]
    lines += ["", report["reading"], ""]
    return "\n".join(lines)




def _reading(med: dict) -> str:
    off, bg, bl = med["off"], med["background"], med["blocking"]
    return (f"Reading (medians): the training thread's checkpoint stall is {off['stall_s']} s without remote_dir "
            f"(the local saves), {bg['stall_s']} s with uploads in the background and {bl['stall_s']} s with the "
            f"pre-fix blocking policy; the loop from step 1 to the last took {off['loop_s']} / {bg['loop_s']} / "
            f"{bl['loop_s']} s, a step alone {off['step_median_s']} / {bg['step_median_s']} / "
            f"{bl['step_median_s']} s. Where the background mode loses: its uploads run on the same 2 cores as "
            "training, and so do moto's server and the proxy here (a remote store would not), so steps and saves "
            "slow down while an upload runs; the end of the run still waits for the last upload (finish "
            f"{bg['finish_s']} s, {off['finish_s']} s without remote_dir); when uploads are slower than the "
            "checkpoint interval a waiting upload is superseded by the next checkpoint (the bucket gets the "
            "newest, not every one; the uploads column counts them), and local folders being uploaded outlive "
            "keep_last until their upload is done.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer steps and one round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--mbps", type=float, default=40.0, help="upload bandwidth cap, MB/s")
    parser.add_argument("rest", nargs="*")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.rest)
        return
    if args.quick:
        args.rounds, args.steps = 1, 8
    from store_servers import S3_ENV, make_bucket, moto_s3

    runs = []
    with tempfile.TemporaryDirectory() as tmp, moto_s3() as (endpoint, _):
        work = Path(tmp)
        shards = _prepare(work)
        make_bucket(endpoint, BUCKET)
        host, port = endpoint.removeprefix("http://").split(":")
        with throttled((host, int(port)), args.mbps * 1e6) as proxy:
            env_s3 = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy}"}
            for round_ in range(1, args.rounds + 1):
                order = ["off", "background", "blocking"] if round_ % 2 else ["blocking", "background", "off"]
                for mode in order:
                    result = run_mode(mode, shards, work, args, env_s3, f"r{round_}")
                    print(json.dumps(result), flush=True)
                    runs.append({"round": round_, **result})
    med = {mode: {k: round(statistics.median(r[k] for r in runs if r["mode"] == mode), 2)
                  for k in ("stall_s", "step_median_s", "loop_s", "finish_s", "wall_s")}
           for mode in ("off", "background", "blocking")}
    report = {"machine": machine(), "command": " ".join(["python", "benchmarks/bench_upload.py", *sys.argv[1:]]),
              "setup": f"BERT hidden 256 x 2 layers, one CPU process, {args.steps} steps, a checkpoint every "
                       f"{args.every}", "mbps": args.mbps, "runs": runs, "median": med, "reading": _reading(med)}
    write_results("bench_upload_quick" if args.quick else "bench_upload", report, _markdown(report))


if __name__ == "__main__":
    main()
