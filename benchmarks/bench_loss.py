"""Benchmark: fused contrastive losses vs naive PyTorch vs OpenCLIP's ClipLoss, and the
training loss itself.

Forward + backward of the loss for B = N in --sizes and D in --dims. Every case runs in
its own fresh subprocess, so peak memory is clean: on CPU the increase of peak RSS
(VmHWM, reset via /proc/self/clear_refs after imports and input allocation) over the RSS
at that point; on CUDA max_memory_allocated minus the allocation before the step.
Time is the median of several forward+backward runs (fewer at large sizes, see `runs`).
GFLOP/s uses the 8*B*N*D model for every method (naive symmetric/OpenCLIP really do
more work: two separate softmaxes, OpenCLIP even two logits matmuls).

Methods: naive / naive_sym (materialised logits + F.cross_entropy), fused / fused_sym
(``clicktower.kernels``), loss_sym (the symmetric training loss,
``clicktower.modeling.losses.ContrastiveLoss`` in one process, with item and query ids drawn
from 2^40 values so that few collide, as in real batches), openclip.

Three more sections, in the same run:

* ratio: at --ratio-size x --ratio-dim, in ONE subprocess, loss_sym, fused (one direction,
  no ids) and two_pass (the symmetric training loss before issue 15: two one-direction
  passes, item ids masking one direction, query ids the other) run in turn, --ratio-reps
  rounds, so load changes hit all three alike; the ratio of the medians and the median of
  the per-round ratios are reported.
* dist: 2 gloo ranks (1 thread each), --dist-local pairs per rank, the cross-device
  symmetric ContrastiveLoss with gather_queries false (one pass, partial column
  log-sum-exps all-reduced) and true (queries all-gathered, a second pass), alternating;
  time per forward+backward is the slower rank's, median over rounds.
* bf16: error of bf16 inputs (bf16 tile matmuls with fp32 accumulation) against fp32
  references, for loss_sym at --bf16-size x --bf16-dim: relative error of loss and gradients
  against the fp32 loss on the original fp32 inputs (what training sees) and on the same
  bf16-rounded inputs (the kernel's own error).

OpenCLIP: `pip install --no-deps open_clip_torch==3.3.0` (benchmarks/requirements.txt).
`import open_clip` imports torchvision, and PyPI torchvision does not import beside the
pinned local torch wheel, so its self-contained `open_clip/loss.py` (torch-only imports)
is loaded as a module file via importlib -- the code is used as published, not copied.

    python benchmarks/bench_loss.py                  # full CPU run (~40 min on 2 cores)
    python benchmarks/bench_loss.py --quick          # smoke run
    python benchmarks/bench_loss.py --device cuda    # GPU, fp32 and bf16 rows
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("naive", "fused", "naive_sym", "fused_sym", "loss_sym", "openclip")
# Bytes per logit element each materialising method keeps alive at its peak
# (logits, scaled logits, log-softmax, grad; symmetric ones twice as many).
NAIVE_BYTES_PER_ELEM = {"naive": 4 * 4, "naive_sym": 8 * 4, "openclip": 8 * 4}
CPU_GFLOPS_GUESS = 120.0  # for skipping cases that would take unreasonably long


def _load_cliploss():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip_torch not installed (pip install --no-deps open_clip_torch)")
    path = Path(list(spec.submodule_search_locations)[0]) / "loss.py"
    mod_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.ClipLoss


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _inputs(size: int, dim: int, dtype, dev, seed: int = 0):
    """Unit-norm query and key embeddings at CLIP's initial temperature 1/0.07 (a realistic
    logit range), and item / query ids from 2^40 values (few collide, as in real batches)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(seed)
    q = F.normalize(torch.randn(size, dim, generator=g), dim=1).to(dev, dtype).requires_grad_()
    k = F.normalize(torch.randn(size, dim, generator=g), dim=1).to(dev, dtype).requires_grad_()
    s = torch.tensor(1 / 0.07, device=dev).requires_grad_()
    ids = torch.randint(0, 1 << 40, (2, size), generator=g).to(dev)
    return q, k, s, ids[0], ids[1]


def _loss_fn(m: str, block_size=None):
    """``fn(q, k, s, item_ids, query_ids) -> loss`` for a method name."""
    import torch
    import torch.nn.functional as F

    from clicktower.kernels.labels import PairLabels
    from clicktower.kernels import fused_contrastive_loss, fused_symmetric_contrastive_loss
    from clicktower.modeling.losses import ContrastiveLoss

    def target(q):
        return torch.arange(q.shape[0], device=q.device)

    if m == "naive":
        return lambda q, k, s, *ids: F.cross_entropy(s * q @ k.T, target(q))
    if m == "fused":
        return lambda q, k, s, *ids: fused_contrastive_loss(q, k, s, block_size=block_size)
    if m == "naive_sym":
        def naive_sym(q, k, s, *ids):
            logits = s * q @ k.T
            return 0.5 * (F.cross_entropy(logits, target(q)) + F.cross_entropy(logits.T, target(q)))
        return naive_sym
    if m == "fused_sym":
        return lambda q, k, s, *ids: fused_symmetric_contrastive_loss(q, k, s, block_size=block_size)
    if m == "loss_sym":
        loss = ContrastiveLoss(symmetric=True, cross_device=False, block_size=block_size)
        return lambda q, k, s, item_ids, query_ids: loss(q, k, s, PairLabels(item_ids=item_ids, query_ids=query_ids))
    if m == "two_pass":  # the symmetric training loss before issue 15, for comparison
        return lambda q, k, s, item_ids, query_ids: 0.5 * (
            fused_contrastive_loss(q, k, s, key_ids=item_ids, block_size=block_size) +
            fused_contrastive_loss(k, q, s, key_ids=query_ids, block_size=block_size))
    if m == "openclip":
        clip = _load_cliploss()()
        return lambda q, k, s, *ids: clip(q, k, s)
    raise ValueError(f"unknown method {m}")


def worker(a) -> dict:
    import torch

    dev = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    B = N = a.size
    q, k, s, item_ids, query_ids = _inputs(a.size, a.dim, dtype, dev)
    loss_fn = _loss_fn(a.method, a.block_size)

    def step():
        loss = loss_fn(q, k, s, item_ids, query_ids)
        loss.backward()
        q.grad = k.grad = s.grad = None
        return float(loss.detach())

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # Memory run (also the warm-up run).
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _rss_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    loss = step()
    sync()
    first = time.perf_counter() - t0
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_kib("VmHWM") * 1024 - base
    # Timed runs: as many as fit in --case-seconds (1..--repeats); at large sizes the
    # memory run is the only run and is reported as such.
    n = max(0, min(a.repeats, int(a.case_seconds / max(first, 1e-6)) - 1))
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if not times:
        times = [first]
    t = statistics.median(times)
    return {"time_s": t, "runs": len(times), "first_run_s": first, "peak_bytes": peak,
            "gflops": 8 * B * N * a.dim / t / 1e9, "loss": loss}


def _timed_step(fn, q, k, s, item_ids, query_ids) -> tuple[float, float]:
    """Wall and process CPU seconds of one forward + backward."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(q, k, s, item_ids, query_ids).backward()
    q.grad = k.grad = s.grad = None
    return time.perf_counter() - t0, time.process_time() - c0


def ratio_worker(a) -> dict:
    """loss_sym, fused and two_pass in turn (the order rotating), a warm-up round and then
    ``a.repeats`` timed rounds, all in this one process."""
    import torch

    q, k, s, item_ids, query_ids = _inputs(a.size, a.dim, torch.float32, torch.device(a.device))
    methods = ("loss_sym", "fused", "two_pass")
    fns = {m: _loss_fn(m, a.block_size) for m in methods}
    times = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    for r in range(a.repeats + 1):
        for m in methods[r % 3:] + methods[:r % 3]:
            wall, used = _timed_step(fns[m], q, k, s, item_ids, query_ids)
            if r:
                times[m].append(wall)
                cpu[m].append(used)
    med = {m: statistics.median(t) for m, t in times.items()}
    cpu_med = {m: statistics.median(t) for m, t in cpu.items()}
    # Each round's methods ran seconds apart, so a round's ratio sees one load; the ratio of
    # the medians can mix quiet and busy rounds.
    ratios = {m: [t / f for t, f in zip(times[m], times["fused"])] for m in ("loss_sym", "two_pass")}
    return {"size": a.size, "dim": a.dim, "rounds": a.repeats, "times_s": times, "median_s": med,
            "round_ratios": ratios, "median_round_ratio": {m: statistics.median(r) for m, r in ratios.items()},
            "ratio_of_medians": {m: med[m] / med["fused"] for m in ratios},
            # CPU seconds the process used (both threads): what the work costs, whatever the load.
            "cpu_s": cpu, "cpu_median_s": cpu_med, "cpu_ratio_of_medians": {m: cpu_med[m] / cpu_med["fused"] for m in ratios},
            "colliding_item_ids": int(q.shape[0] - torch.unique(item_ids).numel()),
            "colliding_query_ids": int(q.shape[0] - torch.unique(query_ids).numel())}


def bf16_worker(a) -> dict:
    """Relative (Frobenius) error of loss_sym on bf16 inputs against fp32 on the original
    inputs and fp32 on the same rounded inputs."""
    import torch

    q, k, s, item_ids, query_ids = _inputs(a.size, a.dim, torch.float32, torch.device(a.device))
    fn = _loss_fn("loss_sym", a.block_size)

    def run(qq, kk):
        qq, kk, ss = qq.detach().clone().requires_grad_(), kk.detach().clone().requires_grad_(), \
            s.detach().clone().requires_grad_()
        loss = fn(qq, kk, ss, item_ids, query_ids)
        loss.backward()
        return {"loss": loss.detach(), "grad_query": qq.grad.float(), "grad_keys": kk.grad.float(),
                "grad_scale": ss.grad}

    got = run(q.bfloat16(), k.bfloat16())
    refs = {"fp32_inputs": run(q, k), "rounded_inputs": run(q.bfloat16().float(), k.bfloat16().float())}
    out = {"size": a.size, "dim": a.dim, "loss_bf16": float(got["loss"])}
    for ref_name, ref in refs.items():
        out[ref_name] = {name: float((got[name].double() - r.double()).norm() / r.double().norm())
                         for name, r in ref.items()}
    out["loss_fp32"] = float(refs["fp32_inputs"]["loss"])
    return out


def _dist_rank(rank: int, world: int, port: int, queue, local: int, dim: int, reps: int) -> None:
    import torch
    import torch.distributed as dist

    from clicktower.kernels.labels import PairLabels
    from clicktower.modeling.losses import ContrastiveLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 ranks on the 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    q, k, s, item_ids, query_ids = _inputs(local, dim, torch.float32, torch.device("cpu"), seed=rank + 1)
    losses = {gather: ContrastiveLoss(True, True, gather, rank=rank, world_size=world) for gather in (False, True)}
    fns = {gather: (lambda q, k, s, items, queries, fn=fn: fn(q, k, s, PairLabels(item_ids=items, query_ids=queries)))
           for gather, fn in losses.items()}
    times = {False: [], True: []}
    for r in range(reps + 1):  # round 0 warms up
        for gather in ((False, True) if r % 2 else (True, False)):
            dist.barrier()
            t = _timed_step(fns[gather], q, k, s, item_ids, query_ids)[0]
            if r:
                times[gather].append(t)
    queue.put((rank, times))
    dist.barrier()
    dist.destroy_process_group()


def dist_rows(local: int, dim: int, reps: int) -> list[dict]:
    """The 2-rank ContrastiveLoss rows, one per gather mode (the slower rank's time per round)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(_dist_rank, args=(2, port, queue, local, dim, reps), nprocs=2, join=False,
                             start_method="spawn")
    times = dict(queue.get() for _ in range(2))
    ctx.join()
    rows = []
    for gather in (False, True):
        rounds = [max(t0, t1) for t0, t1 in zip(times[0][gather], times[1][gather])]
        t = statistics.median(rounds)
        rows.append({"world": 2, "local": local, "dim": dim, "gather_queries": gather, "time_s": t,
                     "rounds": len(rounds), "round_times_s": rounds})
    return rows


def machine(device: str) -> dict:
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem / 2**30, 1),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def skip_reason(method, size, dim, info, args):
    elem = size * size
    if method in NAIVE_BYTES_PER_ELEM:
        need = NAIVE_BYTES_PER_ELEM[method] * elem
        have = (info["gpu_mem_gib"] if args.device == "cuda" else info["ram_gib"]) * 2**30
        if need > 0.6 * have:
            return (f"materialises B*N logits: needs ~{need / 2**30:.0f} GiB "
                    f"(> 60% of {have / 2**30:.0f} GiB)")
    if f"{size}x{dim}" in args.skip.split(","):
        est = 8 * elem * dim / (CPU_GFLOPS_GUESS * 1e9)
        return f"time budget of the whole run (~40 min): est. ~{est / 60:.0f} min per run on this shared CPU"
    if args.device == "cpu":
        est = 8 * elem * dim / (CPU_GFLOPS_GUESS * 1e9)
        if est > args.max_case_seconds:
            return f"too slow on this CPU: ~{est / 60:.0f} min per run at ~{CPU_GFLOPS_GUESS:.0f} GFLOP/s"
        if method == "fused_sym" and size >= args.sym_max_size:
            return (f"time budget: one run ~{est / 60:.0f} min; the one-direction fused run at "
                    f"this size already shows the memory bound")
    return None


def fmt_bytes(b):
    return "-" if b is None else (f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB")


def write_md(path, info, result, args):
    rows = result["rows"]
    lines = ["# bench_loss: fused contrastive loss vs naive PyTorch vs OpenCLIP, and the training loss", "",
             f"Command: `{args.command}`", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM"
             + (f", GPU {info['gpu']}" if "gpu" in info else "")
             + f"; torch {info['torch']} ({info['torch_threads']} threads); {info['date']}.", ""]
    if args.device == "cpu":
        load = ", ".join(f"{x:.1f}" for x in info.get("load_avg_start", ()))
        lines += [f"The machine was shared with other engineers' jobs during the run (1/5/15-min load "
                  f"average {load} at the start on {info['cores']} cores; per row in the JSON), so times "
                  "are noisy: medians help, single runs at large sizes do not, and only the ratio and "
                  "2-rank sections below interleave what they compare.", ""]
    lines += ["Forward + backward of the loss. Time: median of `runs` runs (one warm-up/memory "
              "run first; large sizes: the single memory run is the timed run). Peak: "
              + ("CUDA max_memory_allocated above the inputs." if args.device == "cuda" else
                 "peak RSS of a fresh subprocess per case above its RSS after imports and inputs.")
              + " GFLOP/s: 8*B*N*D / time for every method (naive symmetric and OpenCLIP do more).",
              "", "| B=N | D | dtype | method | time (s) | runs | peak mem | GFLOP/s | vs naive time | vs naive mem | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = {}
    for r in rows:
        if r.get("time_s") is not None and r["method"] in ("naive", "naive_sym") and not r.get("earlier_run"):
            ref[(r["size"], r["dim"], r["dtype"], r["method"])] = r
    for r in rows:
        sym = r["method"] in ("fused_sym", "loss_sym", "openclip")
        base = ref.get((r["size"], r["dim"], r["dtype"], "naive_sym" if sym else "naive"))
        if r.get("earlier_run"):
            base = None
        note = f"earlier run ({r['earlier_run']})" if r.get("earlier_run") else ""
        if r.get("time_s") is None:
            lines.append(f"| {r['size']} | {r['dim']} | {r['dtype']} | {r['method']} | - | - | - | - | - | - | "
                         f"skipped: {r.get('skipped') or r.get('error')}{'; ' + note if note else ''} |")
            continue
        vt = f"{r['time_s'] / base['time_s']:.2f}x" if base and r is not base else "-"
        vm = f"{r['peak_bytes'] / base['peak_bytes']:.3f}x" if base and r is not base and base["peak_bytes"] > 0 else "-"
        lines.append(f"| {r['size']} | {r['dim']} | {r['dtype']} | {r['method']} | {r['time_s']:.3f} | {r['runs']} | "
                     f"{fmt_bytes(r['peak_bytes'])} | {r['gflops']:.1f} | {vt} | {vm} | {note} |")
    lines += ["", "Symmetric vs one-direction fused time from this run's rows (separate subprocesses minutes "
              "apart: under a changing load these ratios are noise; the interleaved section below measures it):", ""]
    for r in rows:
        if r["method"] in ("fused_sym", "loss_sym") and r.get("time_s") and not r.get("earlier_run"):
            one = next((x for x in rows if x["method"] == "fused" and x.get("time_s") and not x.get("earlier_run")
                        and (x["size"], x["dim"], x["dtype"]) == (r["size"], r["dim"], r["dtype"])), None)
            if one:
                lines.append(f"- {r['method']}, B=N={r['size']}, D={r['dim']}, {r['dtype']}: "
                             f"{r['time_s'] / one['time_s']:.2f}x")
    lines += _sections_md(result)
    path.write_text("\n".join(lines) + "\n")


def _sections_md(result: dict) -> list[str]:
    lines = []
    ratio = result.get("ratio")
    if ratio:
        med, per_round, of_medians = ratio["median_s"], ratio["median_round_ratio"], ratio["ratio_of_medians"]
        lines += ["", f"## The symmetric training loss vs one direction (B=N={ratio['size']}, D={ratio['dim']}, fp32)",
                  "", f"One process, {ratio['rounds']} rounds of loss_sym, fused and two_pass in turn (rotating order) "
                  f"after a warm-up round; ids from 2^40 values ({ratio['colliding_item_ids']} item and "
                  f"{ratio['colliding_query_ids']} query ids collide). A round's three runs follow each other within "
                  "seconds, so its ratios see one load; the median of those per-round ratios is the figure to read.",
                  "Process CPU time (both threads) measures the work whatever the load; it is the second "
                  "figure to read.", "",
                  "| method | median time (s) | vs fused: median per-round ratio | ratio of medians | "
                  "median CPU time (s) | vs fused, CPU time | per-round ratios |", "|---|---|---|---|---|---|---|",
                  f"| fused (one direction, no ids) | {med['fused']:.3f} | 1.00x | 1.00x | "
                  f"{ratio['cpu_median_s']['fused']:.3f} | 1.00x | |"]
        for m, label in (("loss_sym", "loss_sym (ContrastiveLoss, symmetric, ids: one pass)"),
                         ("two_pass", "two_pass (the training loss before: two one-direction passes)")):
            rounds = ", ".join(f"{x:.2f}" for x in ratio["round_ratios"][m])
            lines.append(f"| {label} | {med[m]:.3f} | {per_round[m]:.2f}x | {of_medians[m]:.2f}x | "
                         f"{ratio['cpu_median_s'][m]:.3f} | {ratio['cpu_ratio_of_medians'][m]:.2f}x | {rounds} |")
        lines += ["", "Round times (s): " + "; ".join(
            f"{m} " + ", ".join(f"{t:.2f}" for t in ts) for m, ts in ratio["times_s"].items())]
    if result.get("dist"):
        d0 = result["dist"][0]
        lines += ["", f"## Cross-device ContrastiveLoss, 2 gloo ranks (1 thread each), {d0['local']} pairs per rank, "
                  f"D={d0['dim']}, fp32", "", "Symmetric, item and query ids, the two gather modes alternating; "
                  "time per forward+backward: the slower rank's, median over rounds.", "",
                  "| gather_queries | time (s) | rounds |", "|---|---|---|"]
        for r in result["dist"]:
            how = "true (queries all-gathered, second pass)" if r["gather_queries"] else \
                "false (one pass, partial column lse all-reduced)"
            lines.append(f"| {how} | {r['time_s']:.3f} | {r['rounds']} |")
    bf = result.get("bf16")
    if bf:
        lines += ["", f"## bf16 inputs (loss_sym, B=N={bf['size']}, D={bf['dim']})", "",
                  "Relative error (Frobenius norm of the difference / norm of the reference) of the loss and its "
                  "gradients with bf16 query and key embeddings (bf16 tile matmuls, fp32 accumulation and "
                  "softmax statistics) against fp32:", "",
                  "| reference | loss | grad query | grad keys | grad scale |", "|---|---|---|---|---|"]
        for name, label in (("fp32_inputs", "fp32 loss on the original fp32 inputs"),
                            ("rounded_inputs", "fp32 loss on the same bf16-rounded inputs")):
            e = bf[name]
            lines.append(f"| {label} | {e['loss']:.1e} | {e['grad_query']:.1e} | {e['grad_keys']:.1e} | "
                         f"{e['grad_scale']:.1e} |")
    return lines


def _run_worker(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True)
    res = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode == 0 and res:
        return json.loads(res[-1][7:])
    return {"error": (proc.stderr.strip().splitlines() or ["rc %d" % proc.returncode])[-1][:200]}


def _earlier_rows(earlier: dict, rows: list[dict]) -> list[dict]:
    """Rows of an earlier results JSON that this run did not measure, marked with its date."""
    have = {(r["size"], r["dim"], r["dtype"], r["method"]) for r in rows}
    date = earlier.get("machine", {}).get("date", "date unknown")
    return [{**r, "earlier_run": date} for r in earlier["rows"]
            if (r["size"], r["dim"], r["dtype"], r["method"]) not in have]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", default="4096,16384,65536,262144")
    p.add_argument("--dims", default="256,768")
    p.add_argument("--dtypes", default=None, help="default: fp32 on CPU, fp32,bf16 on CUDA")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5, help="max timed runs per case")
    p.add_argument("--case-seconds", type=float, default=25.0, help="time budget per case for repeats")
    p.add_argument("--max-case-seconds", type=float, default=1800.0, help="skip cases estimated slower")
    p.add_argument("--sym-max-size", type=int, default=262144, help="CPU: skip fused_sym at >= this size")
    p.add_argument("--skip", default="", help="SIZExDIM cases to skip for the time budget, e.g. 65536x768")
    p.add_argument("--ratio-size", type=int, default=8192, help="ratio section: B = N (0: no section)")
    p.add_argument("--ratio-dim", type=int, default=256)
    p.add_argument("--ratio-reps", type=int, default=7, help="ratio section: timed rounds")
    p.add_argument("--dist-local", type=int, default=4096, help="2-rank section: pairs per rank (0: none)")
    p.add_argument("--dist-dim", type=int, default=256)
    p.add_argument("--dist-reps", type=int, default=5)
    p.add_argument("--bf16-size", type=int, default=4096, help="bf16 error section: B = N (0: none)")
    p.add_argument("--bf16-dim", type=int, default=256)
    p.add_argument("--keep-from", default=None, help="earlier results JSON: keep its rows this run does not measure")
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, few repeats")
    p.add_argument("--out", default=str(RESULTS / "bench_loss"), help="output path stem (.json/.md)")
    # worker mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--section", default="table", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        fn = {"table": worker, "ratio": ratio_worker, "bf16": bf16_worker}[a.section]
        print("RESULT " + json.dumps(fn(a)), flush=True)
        return
    a.command = "python benchmarks/bench_loss.py " + " ".join(sys.argv[1:])
    if a.quick:
        a.sizes, a.dims, a.repeats, a.case_seconds = "1024,2048", "64", 2, 5.0
        a.ratio_size, a.ratio_reps, a.dist_local, a.dist_reps, a.bf16_size = 1024, 2, 512, 2, 512
        if a.out == str(RESULTS / "bench_loss"):
            a.out = "/tmp/bench_loss_quick"
    dtypes = (a.dtypes or ("fp32,bf16" if a.device == "cuda" else "fp32")).split(",")
    # Read before this run overwrites it (the default output is the earlier results file).
    earlier = json.loads(Path(a.keep_from).read_text()) if a.keep_from else None
    info = machine(a.device)
    info["load_avg_start"] = os.getloadavg()
    result = {"machine": info, "command": a.command, "rows": []}
    stem = Path(a.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def save():
        info["elapsed_s"] = round(time.time() - t_start, 1)
        info["load_avg_now"] = os.getloadavg()
        Path(str(stem) + ".json").write_text(json.dumps(result, indent=1))
        write_md(Path(str(stem) + ".md"), info, result, a)

    common = ["--device", a.device, "--repeats", str(a.repeats), "--case-seconds", str(a.case_seconds)]
    common += ["--block-size", str(a.block_size)] if a.block_size else []
    for size in [int(x) for x in a.sizes.split(",")]:
        for dim in [int(x) for x in a.dims.split(",")]:
            for dtype in dtypes:
                for method in a.methods.split(","):
                    row = {"size": size, "dim": dim, "dtype": dtype, "method": method, "device": a.device}
                    reason = skip_reason(method, size, dim, info, a)
                    if reason:
                        row["skipped"] = reason
                    else:
                        row.update(_run_worker(["--method", method, "--size", str(size), "--dim", str(dim),
                                                "--dtype", dtype, *common]))
                    row["load1"] = os.getloadavg()[0]
                    result["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    save()
    if a.ratio_size:
        result["ratio"] = _run_worker(["--section", "ratio", "--size", str(a.ratio_size), "--dim", str(a.ratio_dim),
                                       *common[:2], "--repeats", str(a.ratio_reps), *common[6:]])
        print(json.dumps(result["ratio"]), flush=True)
        save()
    if a.dist_local:
        result["dist"] = dist_rows(a.dist_local, a.dist_dim, a.dist_reps)
        print(json.dumps(result["dist"]), flush=True)
        save()
    if a.bf16_size:
        result["bf16"] = _run_worker(["--section", "bf16", "--size", str(a.bf16_size), "--dim", str(a.bf16_dim),
                                      *common])
        print(json.dumps(result["bf16"]), flush=True)
    if earlier:
        result["rows"] += _earlier_rows(earlier, result["rows"])
    save()


if __name__ == "__main__":
    main()
