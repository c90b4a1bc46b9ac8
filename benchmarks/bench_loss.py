"""Benchmark: fused contrastive losses vs naive PyTorch vs OpenCLIP's ClipLoss.

Forward + backward of the loss for B = N in --sizes and D in --dims. Every case runs in
its own fresh subprocess, so peak memory is clean: on CPU the increase of peak RSS
(VmHWM, reset via /proc/self/clear_refs after imports and input allocation) over the RSS
at that point; on CUDA max_memory_allocated minus the allocation before the step.
Time is the median of several forward+backward runs (fewer at large sizes, see `runs`).
GFLOP/s uses the 8*B*N*D model for every method (naive symmetric/OpenCLIP really do
more work: two separate softmaxes, OpenCLIP even two logits matmuls).

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
METHODS = ("naive", "fused", "naive_sym", "fused_sym", "openclip")
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


def worker(a) -> dict:
    import torch
    import torch.nn.functional as F

    from clicktower.kernels import fused_contrastive_loss, fused_symmetric_contrastive_loss

    dev = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)
    B = N = a.size
    # Unit-norm embeddings at CLIP's initial temperature 1/0.07: realistic logit range.
    q = F.normalize(torch.randn(B, a.dim, generator=g), dim=1).to(dev, dtype).requires_grad_()
    k = F.normalize(torch.randn(N, a.dim, generator=g), dim=1).to(dev, dtype).requires_grad_()
    s = torch.tensor(1 / 0.07, device=dev).requires_grad_()
    ar = torch.arange(B, device=dev)
    m = a.method
    if m == "openclip":
        clip = _load_cliploss()()

    def step():
        if m == "naive":
            loss = F.cross_entropy(s * q @ k.T, ar)
        elif m == "fused":
            loss = fused_contrastive_loss(q, k, s, block_size=a.block_size)
        elif m == "naive_sym":
            logits = s * q @ k.T
            loss = 0.5 * (F.cross_entropy(logits, ar) + F.cross_entropy(logits.T, ar))
        elif m == "fused_sym":
            loss = fused_symmetric_contrastive_loss(q, k, s, block_size=a.block_size)
        else:
            loss = clip(q, k, s)
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


def write_md(path, info, rows, args):
    lines = ["# bench_loss: fused contrastive loss vs naive PyTorch vs OpenCLIP", "",
             f"Command: `{args.command}`", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM"
             + (f", GPU {info['gpu']}" if "gpu" in info else "")
             + f"; torch {info['torch']} ({info['torch_threads']} threads); {info['date']}.", ""]
    if args.device == "cpu":
        lines += ["The machine was shared with other engineers' jobs during the run, so times are "
                  "noisy (medians help, but single runs at large sizes do not).", ""]
    lines += ["Forward + backward of the loss. Time: median of `runs` runs (one warm-up/memory "
              "run first; large sizes: the single memory run is the timed run). Peak: "
              + ("CUDA max_memory_allocated above the inputs." if args.device == "cuda" else
                 "peak RSS of a fresh subprocess per case above its RSS after imports and inputs.")
              + " GFLOP/s: 8*B*N*D / time for every method (naive symmetric and OpenCLIP do more).",
              "", "| B=N | D | dtype | method | time (s) | runs | peak mem | GFLOP/s | vs naive time | vs naive mem | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = {}
    for r in rows:
        if r.get("time_s") is not None and r["method"] in ("naive", "naive_sym"):
            ref[(r["size"], r["dim"], r["dtype"], r["method"])] = r
    for r in rows:
        base = ref.get((r["size"], r["dim"], r["dtype"], "naive_sym" if r["method"] in ("fused_sym", "openclip") else "naive"))
        if r.get("time_s") is None:
            lines.append(f"| {r['size']} | {r['dim']} | {r['dtype']} | {r['method']} | - | - | - | - | - | - | "
                         f"skipped: {r.get('skipped') or r.get('error')} |")
            continue
        vt = f"{r['time_s'] / base['time_s']:.2f}x" if base and r is not base else "-"
        vm = f"{r['peak_bytes'] / base['peak_bytes']:.3f}x" if base and r is not base and base["peak_bytes"] > 0 else "-"
        lines.append(f"| {r['size']} | {r['dim']} | {r['dtype']} | {r['method']} | {r['time_s']:.3f} | {r['runs']} | "
                     f"{fmt_bytes(r['peak_bytes'])} | {r['gflops']:.1f} | {vt} | {vm} | |")
    # Symmetric vs one-direction fused.
    lines += ["", "Symmetric fused vs one-direction fused time:", ""]
    for r in rows:
        if r["method"] == "fused_sym" and r.get("time_s"):
            one = next((x for x in rows if x["method"] == "fused" and x.get("time_s") and
                        (x["size"], x["dim"], x["dtype"]) == (r["size"], r["dim"], r["dtype"])), None)
            if one:
                lines.append(f"- B=N={r['size']}, D={r['dim']}, {r['dtype']}: {r['time_s'] / one['time_s']:.2f}x")
    path.write_text("\n".join(lines) + "\n")


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
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, few repeats")
    p.add_argument("--out", default=str(RESULTS / "bench_loss"), help="output path stem (.json/.md)")
    # worker mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return
    a.command = "python benchmarks/bench_loss.py " + " ".join(sys.argv[1:])
    if a.quick:
        a.sizes, a.dims, a.repeats, a.case_seconds = "1024,2048", "64", 2, 5.0
        if a.out == str(RESULTS / "bench_loss"):
            a.out = "/tmp/bench_loss_quick"
    dtypes = (a.dtypes or ("fp32,bf16" if a.device == "cuda" else "fp32")).split(",")
    info = machine(a.device)
    rows = []
    stem = Path(a.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    for size in [int(x) for x in a.sizes.split(",")]:
        for dim in [int(x) for x in a.dims.split(",")]:
            for dtype in dtypes:
                for method in a.methods.split(","):
                    row = {"size": size, "dim": dim, "dtype": dtype, "method": method, "device": a.device}
                    reason = skip_reason(method, size, dim, info, a)
                    if reason:
                        row["skipped"] = reason
                    else:
                        cmd = [sys.executable, __file__, "--worker", "--method", method, "--size", str(size),
                               "--dim", str(dim), "--dtype", dtype, "--device", a.device,
                               "--repeats", str(a.repeats), "--case-seconds", str(a.case_seconds)]
                        if a.block_size:
                            cmd += ["--block-size", str(a.block_size)]
                        proc = subprocess.run(cmd, capture_output=True, text=True)
                        res = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                        if proc.returncode == 0 and res:
                            row.update(json.loads(res[-1][7:]))
                        else:
                            row["error"] = (proc.stderr.strip().splitlines() or ["rc %d" % proc.returncode])[-1][:200]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    info["elapsed_s"] = round(time.time() - t_start, 1)
                    Path(str(stem) + ".json").write_text(json.dumps({"machine": info, "command": a.command, "rows": rows}, indent=1))
                    write_md(Path(str(stem) + ".md"), info, rows, a)


if __name__ == "__main__":
    main()
