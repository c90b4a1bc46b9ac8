"""GPU check (issue 15, deliverable 6): one script, one device call, under 6 minutes.

Measures, on one GPU:

1. Loss: forward + backward of the contrastive loss alone at B = N in ``--sizes``
   (16384, 65536), D = ``--dim`` (768), inputs in ``--dtype`` (bf16): clicktower's fused
   kernels against naive PyTorch (``F.cross_entropy`` on the materialised logits) and the
   OpenCLIP ``ClipLoss`` formula, one direction and symmetric. Time: median of
   ``torch.cuda.synchronize()``-bracketed runs after one warm-up run. Memory:
   ``torch.cuda.max_memory_allocated()`` above the allocation after the inputs were made
   (``reset_peak_memory_stats`` before the measured run), i.e. the loss's working memory
   plus the input gradients. A CUDA out-of-memory error is recorded as "OOM".
2. Train step: one optimiser step of a shared-tower BERT-base TwoTower (random init, BERT's
   default dropout 0.1), ``--batch`` (512) pairs x ``--seq`` (32) tokens for queries and
   items alike, bf16 mixed precision (autocast, fp32 master weights: clicktower's
   ``train.mixed_precision=bf16``), the symmetric in-batch ``ContrastiveLoss``, AdamW and the
   LR schedule of ``launcher/engine/optim.py``, run by the project's own
   ``clicktower.launcher.engine.step.TrainStep``: once without GradCache and once with
   ``--grad-cache-chunk`` (128: 4 chunks). Pairs/s = batch / median step time; peak memory =
   ``max_memory_allocated`` during the measured step (absolute, and above the model +
   optimiser state held before it).

Run on the device machine (no network, no package registry), from the repository root:

    pip install --no-deps --no-build-isolation -e . -q; python benchmarks/gpu_check.py

(``--no-build-isolation``: an isolated build would fetch setuptools from the network. The
script also runs without the install: when ``import clicktower`` fails it maps the
namespace package ``clicktower`` onto the repository root, as ``setup.py``'s package_dir
does.) It writes ``benchmarks/results/gpu_check.json`` and ``.md`` and prints the markdown.
CPU dry run (tiny sizes, tiny BERT; writes ``gpu_check_cpu_dryrun.{json,md}`` instead, so
a CPU run never overwrites GPU figures):

    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick

Imports: torch, transformers, clicktower's ``kernels/`` and ``modeling/``, and
``launcher/engine/step.py`` (whose import chain, ``launcher.engine.distributed``,
``.optim``, ``launcher.errors`` -> ``data.errors``, imports only torch at module level:
DeepSpeed only lazily, under ZeRO-3). ``accelerate`` is used for the ``Accelerator`` when
installed (it is on the device); otherwise a single-device stand-in with the same
methods (autocast, backward, no_sync, clip_grad_norm_) drives ``TrainStep``. The JSON records
which one ran, and which of deepspeed, webdataset, faiss, open_clip got imported (none should).

OpenCLIP's ``ClipLoss`` is not installed on the device, so ``openclip_clip_loss`` below is
an inline copy of its single-process path (``open_clip/loss.py``, ``ClipLoss.get_logits``
with world_size == 1, and ``ClipLoss.forward``; open_clip_torch 3.3.0): note it computes
``logits_per_text`` by a SECOND matmul, ``logit_scale * text @ image.T``, not by a transpose
(the transpose is its multi-GPU ``local_loss=False`` path). When ``open_clip`` can be found
(e.g. ``pip install --no-deps --target /tmp/oc open_clip_torch==3.3.0`` and
``PYTHONPATH=/tmp/oc``), the script first asserts that the copy equals ``ClipLoss`` in value
and gradients on a small input (its ``loss.py`` is loaded as a file, like bench_loss.py,
because ``import open_clip`` needs torchvision).

Runtime estimate on an H200 (about 990 TFLOP/s dense bf16, ~60 TFLOP/s fp32 without
TF32, 4.8 TB/s): every method does ~8*B*N*D FLOPs (naive symmetric and OpenCLIP more
elementwise work); at 65536 x 768 that is 2.6e13 FLOP. Naive bf16 runs its matmuls on
bf16 tensor cores (~0.05 s) plus ~10 passes over 8 GiB bf16 logit tensors (~0.05 s):
~0.1-0.2 s per run, ~40-60 GiB peak (OpenCLIP: two logit matrices, more). The fused
kernels (as of this writing; the JSON records the source hashes) upcast to fp32 and run
``torch.mm`` on fp32 tiles: ~0.5 s per run without TF32 (``--tf32`` allows it), i.e. likely
several times naive's bf16 time. Each loss case runs 1 warm-up + 1 measured run + more timed
runs while they fit in ``--case-seconds`` (``--repeats`` in all at most): the 10 loss cases take ~30-60 s. A BERT-base
step of 512 x 32 tokens per tower is ~6 * 110e6 * 32768 = 2.2e13 FLOP (GradCache: ~1.3x):
~0.1-0.3 s; 2 warm-up + up to 5 measured steps per variant plus model builds: ~20 s. With
imports and CUDA start-up the whole check should take about 1-2 minutes; ``--budget-s``
(330 s) skips the remaining cases if it ever runs long, and the JSON and markdown are
rewritten after every case, so a killed run still leaves its figures.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MIB, GIB = 2 ** 20, 2 ** 30
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512)
BERT_TINY = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=256, max_position_embeddings=64)
# (method, direction, reference method for the "vs naive" columns, label)
LOSS_METHODS = {
    "naive": ("one", None, "naive PyTorch: F.cross_entropy(s * q @ k.T)"),
    "fused": ("one", "naive", "clicktower fused_contrastive_loss"),
    "naive_sym": ("sym", None, "naive PyTorch symmetric: one logits matrix, CE of it and of its .T"),
    "fused_sym": ("sym", "naive_sym", "clicktower fused_symmetric_contrastive_loss"),
    "openclip": ("sym", "naive_sym", "OpenCLIP ClipLoss formula (inline copy)"),
}
FORBIDDEN_IMPORTS = ("deepspeed", "webdataset", "faiss", "open_clip")
OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


def import_clicktower() -> str:
    """Make ``clicktower.*`` importable: the installed package, else the repository root.

    Returns:
        "installed" or "repository root (not installed)".
    """
    try:
        import clicktower.kernels  # noqa: F401
        return "installed"
    except ImportError:
        pkg = types.ModuleType("clicktower")
        pkg.__path__ = [str(ROOT)]  # setup.py: package_dir clicktower.X -> X/
        sys.modules["clicktower"] = pkg
        import clicktower.kernels  # noqa: F401
        return "repository root (not installed)"


def openclip_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                       logit_scale: torch.Tensor) -> torch.Tensor:
    """OpenCLIP ClipLoss formula (inline copy), single process, no logit bias.

    Copied from open_clip_torch 3.3.0, ``src/open_clip/loss.py``: ``ClipLoss.get_logits``
    (the ``world_size == 1`` branch) and ``ClipLoss.forward`` (labels = arange).

    Args:
        image_features: [B, D] (clicktower: queries).
        text_features: [B, D] (clicktower: items).
        logit_scale: 0-dim scale.

    Returns:
        The symmetric loss (mean of both cross-entropies).
    """
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    labels = torch.arange(logits_per_image.shape[0], device=image_features.device, dtype=torch.long)
    total_loss = (
        F.cross_entropy(logits_per_image, labels) +
        F.cross_entropy(logits_per_text, labels)
    ) / 2
    return total_loss


def check_openclip_copy() -> str:
    """Assert the inline copy equals open_clip's ``ClipLoss`` (value and gradients) on a
    small fp32 input, when open_clip can be found; its ``loss.py`` is loaded as a file.

    Returns:
        What was checked, for the report.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return "not checked: open_clip not installed here (the inline copy runs alone)"
    path = Path(list(spec.submodule_search_locations)[0]) / "loss.py"
    mod_spec = importlib.util.spec_from_file_location("open_clip_loss_file", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(1)
    results = []
    for fn in (mod.ClipLoss(), openclip_clip_loss):
        a = F.normalize(torch.randn(64, 16, generator=g.manual_seed(1)), dim=1).requires_grad_()
        b = F.normalize(torch.randn(64, 16, generator=g.manual_seed(2)), dim=1).requires_grad_()
        s = torch.tensor(1 / 0.07).requires_grad_()
        loss = fn(a, b, s)
        loss.backward()
        results.append((loss.detach(), a.grad, b.grad, s.grad))
    diff = max(float((x - y).abs().max()) for x, y in zip(*results))
    assert diff <= 1e-6, f"inline ClipLoss copy differs from {path}: max abs diff {diff}"
    return f"equal to open_clip ClipLoss ({path}): loss and grads, max abs diff {diff:.1e}"


def _rss_kib(field: str) -> int:
    """A /proc/self/status memory field in KiB.

    Args:
        field: e.g. "VmRSS" or "VmHWM".
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


class Meter:
    """Peak memory of what runs between ``start`` and ``stop``.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: peak RSS
    (VmHWM, reset to the current RSS through /proc/self/clear_refs) -- labelled as such.

    Args:
        device: the device measured.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.base = 0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def start(self) -> None:
        gc.collect()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        self.base = _rss_kib("VmRSS") * 1024

    def stop(self) -> dict:
        """Returns: {"peak_bytes": above the start, "peak_abs_bytes", "base_bytes"}."""
        self.sync()
        peak = torch.cuda.max_memory_allocated() if self.cuda else _rss_kib("VmHWM") * 1024
        return {"peak_bytes": peak - self.base, "peak_abs_bytes": peak, "base_bytes": self.base}


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached CUDA blocks (between cases, after an OOM).

    Args:
        device: the device measured.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(fn, meter: Meter, case_seconds: float, repeats: int) -> dict:
    """One warm-up call, one measured call (time + peak memory), then more timed calls while
    they fit in ``case_seconds`` (at most ``repeats`` in all). A warm-up call slower than
    ``case_seconds`` is itself the measurement (its memory includes one-time workspaces).

    Args:
        fn: the call; returns the loss as a float.
        meter: memory meter of the device.
        case_seconds: time budget for the repeats.
        repeats: most timed calls.

    Returns:
        time_s (median), runs, warmup_s, loss and the meter's fields.
    """
    meter.start()
    t0 = time.perf_counter()
    value = fn()
    meter.sync()
    warm = time.perf_counter() - t0
    if warm > case_seconds:
        return {"time_s": warm, "runs": 1, "warmup_s": warm, "loss": value, **meter.stop(),
                "note": "warm-up run only (slower than --case-seconds)"}
    times = []
    meter.start()
    t0 = time.perf_counter()
    value = fn()
    meter.sync()
    times.append(time.perf_counter() - t0)
    mem = meter.stop()
    spent = times[0]
    while len(times) < repeats and spent + times[0] <= case_seconds:
        t0 = time.perf_counter()
        fn()
        meter.sync()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    return {"time_s": statistics.median(times), "runs": len(times), "warmup_s": warm, "loss": value, **mem}


def loss_case(method: str, size: int, args, device: torch.device) -> dict:
    """Forward + backward of one loss method at B = N = size.

    Args:
        method: a key of ``LOSS_METHODS``.
        size: B = N.
        args: parsed CLI (dim, dtype, case_seconds, repeats).
        device: where it runs.

    Returns:
        The measurement (``measure``), or {"error": "OOM"} / {"error": message}.
    """
    from clicktower.kernels import fused_contrastive_loss, fused_symmetric_contrastive_loss

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    g = torch.Generator(device=device).manual_seed(0)
    # Unit-norm embeddings at CLIP's initial temperature 1/0.07: a realistic logit range.
    q = F.normalize(torch.randn(size, args.dim, generator=g, device=device), dim=1).to(dtype).requires_grad_()
    k = F.normalize(torch.randn(size, args.dim, generator=g, device=device), dim=1).to(dtype).requires_grad_()
    s = torch.tensor(1 / 0.07, device=device).requires_grad_()
    ar = torch.arange(size, device=device)

    def step() -> float:
        if method == "naive":
            loss = F.cross_entropy(s * q @ k.T, ar)
        elif method == "fused":
            loss = fused_contrastive_loss(q, k, s)
        elif method == "naive_sym":
            logits = s * q @ k.T
            loss = 0.5 * (F.cross_entropy(logits, ar) + F.cross_entropy(logits.T, ar))
        elif method == "fused_sym":
            loss = fused_symmetric_contrastive_loss(q, k, s)
        else:
            loss = openclip_clip_loss(q, k, s)
        loss.backward()
        q.grad = k.grad = s.grad = None
        return float(loss.detach())

    oom = False
    try:
        row = measure(step, Meter(device), args.case_seconds, args.repeats)
    except OOM_ERRORS:
        oom = True
    except RuntimeError as exc:  # CPU allocators raise plain RuntimeErrors
        if "out of memory" not in str(exc) and "can't allocate memory" not in str(exc):
            raise
        oom = True
    if oom:
        q.grad = k.grad = s.grad = None
        return {"error": "OOM"}
    row["gflops"] = 8 * size * size * args.dim / row["time_s"] / 1e9
    return row


class LocalAccelerator:
    """Single-device stand-in for ``accelerate.Accelerator`` with what ``TrainStep`` calls,
    used only when accelerate is not installed. Same semantics for one process without
    gradient accumulation: bf16 autocast, plain backward, no-op no_sync, torch clipping.

    Args:
        device: the device.
    """

    num_processes = 1
    gradient_accumulation_steps = 1

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.state = types.SimpleNamespace(deepspeed_plugin=None)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self, model):
        return contextlib.nullcontext()

    def clip_grad_norm_(self, parameters, max_norm: float):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def prepare(self, *objects):
        return objects

    def free_memory(self, *objects):
        return objects


def make_accelerator(device: torch.device):
    """``accelerate.Accelerator(mixed_precision="bf16")`` (as ``train(cfg)`` builds it), or the
    stand-in without accelerate.

    Args:
        device: cpu or cuda.

    Returns:
        (accelerator, description).
    """
    try:
        from accelerate import Accelerator
    except ImportError:
        return LocalAccelerator(device), "LocalAccelerator stand-in (accelerate not installed)"
    import accelerate

    acc = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16")
    if acc.device.type != device.type:
        raise RuntimeError(f"accelerate picked {acc.device}, expected {device}")
    return acc, f"accelerate {accelerate.__version__} Accelerator(mixed_precision='bf16')"


def build_train_step(args, accelerator, device: torch.device, chunk: int | None):
    """The model, optimiser, schedule and ``TrainStep`` as ``launcher.engine.training.train``
    builds them for one process (towers from ``TwoTowerConfig.bert_config``, random init).

    Args:
        args: parsed CLI (batch, seq, optim_impl, quick).
        accelerator: from ``make_accelerator``.
        device: where the model lives.
        chunk: GradCache chunk in pairs, or None.

    Returns:
        (step, a ``PairBatch`` of token tensors on ``device``, parameter count).
    """
    from clicktower.data.batch import PairBatch
    from clicktower.launcher.engine.optim import OptimConfig, Optimization, build_optimizer, build_scheduler
    from clicktower.launcher.engine.step import TrainStep
    from clicktower.modeling.losses import ContrastiveLoss
    from clicktower.modeling.towers import TwoTower, TwoTowerConfig

    bert = BERT_TINY if args.quick else BERT_BASE
    torch.manual_seed(0)
    cfg = TwoTowerConfig(bert_config=dict(bert), tokenizer="(none: random token ids)", shared_towers=True,
                         max_query_length=args.seq, max_item_length=args.seq)
    model = TwoTower.from_config(cfg).to(device)
    optim_cfg = OptimConfig(implementation=args.optim_impl)
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, max_steps=1000)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = ContrastiveLoss(symmetric=True, cross_device=False)
    step = TrainStep(accelerator, model, loss_fn, Optimization(optimizer, scheduler, optim_cfg.max_grad_norm), chunk)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.seq)
    batch = {"query_input_ids": torch.randint(1000 % bert["vocab_size"], bert["vocab_size"], shape, generator=g),
             "item_input_ids": torch.randint(1000 % bert["vocab_size"], bert["vocab_size"], shape, generator=g),
             "query_attention_mask": torch.ones(shape, dtype=torch.long),
             "item_attention_mask": torch.ones(shape, dtype=torch.long)}
    keys = [str(i) for i in range(args.batch)]
    batch = PairBatch(keys=keys, queries=keys, items=keys, tokens=batch).to(device)
    params = sum(p.numel() for p in model.parameters())
    return step, batch, params


def train_case(chunk: int | None, args, accelerator, device: torch.device) -> dict:
    """One optimiser step of the TwoTower through ``TrainStep``: ``--train-warmup`` steps,
    then the measured step(s).

    Args:
        chunk: GradCache chunk in pairs (None: off).
        args: parsed CLI.
        accelerator: from ``make_accelerator``.
        device: where it runs.

    Returns:
        The measurement with pairs_per_s, or {"error": "OOM"}.
    """
    step = batch = None
    oom = False
    try:
        step, batch, params = build_train_step(args, accelerator, device, chunk)
        for _ in range(max(0, args.train_warmup - 1)):  # measure() runs one more warm-up step
            step(batch)
        row = measure(lambda: float(step(batch)), Meter(device), args.case_seconds, args.train_steps)
    except OOM_ERRORS:
        oom = True
    finally:
        step = batch = None
        accelerator.free_memory()
        free_memory(device)
    if oom:
        return {"error": "OOM"}
    row["params"] = params
    row["pairs_per_s"] = args.batch / row["time_s"]
    row["chunks"] = 1 if chunk is None else -(-args.batch // chunk)
    return row


def machine_info(device: torch.device, clicktower_source: str, accelerator_desc: str) -> dict:
    """Machine, versions and the sources that ran (hashes: other engineers edit kernels/).

    Args:
        device: the device measured.
        clicktower_source: from ``import_clicktower``.
        accelerator_desc: from ``make_accelerator``.
    """
    import transformers

    import clicktower.kernels
    import clicktower.modeling.losses

    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    files = {}
    for name in ("kernels/contrastive.py", "modeling/losses.py", "modeling/towers.py", "launcher/engine/step.py"):
        path = Path(clicktower.kernels.__file__).resolve().parent.parent / name
        if path.is_file():
            files[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    info = {"device": device.type, "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "clicktower": f"{clicktower_source}: {Path(clicktower.kernels.__file__).resolve().parent.parent}",
            "source_sha256_12": files, "accelerator": accelerator_desc,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_mem_gib=round(props.total_memory / GIB, 1),
                    cuda=torch.version.cuda, tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    float32_matmul_precision=torch.get_float32_matmul_precision())
    return info


def fmt_bytes(b) -> str:
    """Bytes as MiB/GiB for the markdown.

    Args:
        b: bytes, or None.
    """
    if b is None:
        return "-"
    return f"{b / GIB:.2f} GiB" if abs(b) >= GIB else f"{b / MIB:.1f} MiB"


def target_lines(rows: list[dict], args) -> list[str]:
    """The issue's target: fused bf16 at the largest size within 1.2x naive time, loss memory
    under 1 GiB; one line per direction (fused vs naive, fused_sym vs naive_sym).

    Args:
        rows: loss rows.
        args: parsed CLI.
    """
    size = max(int(x) for x in args.sizes.split(","))
    lines = [f"Target: fused {args.dtype} at B=N={size}, D={args.dim} within 1.2x naive time, "
             "loss memory under 1 GiB." + (" (CPU dry run: tiny sizes, CPU times; NOT the target's "
                                           "measurement.)" if args.device == "cpu" else ""), ""]
    by = {r["method"]: r for r in rows if r["size"] == size}
    for fused, naive in (("fused", "naive"), ("fused_sym", "naive_sym")):
        f, n = by.get(fused, {}), by.get(naive, {})
        if f.get("time_s") is None:
            lines.append(f"- {fused}: not measured ({f.get('error') or f.get('skipped') or 'not run'})")
            continue
        mem_ok = f["peak_bytes"] < GIB
        if n.get("time_s") is None:
            verdict = (f"{naive} {n.get('error') or n.get('skipped') or 'not run'}: time ratio unavailable; "
                       f"memory {fmt_bytes(f['peak_bytes'])} ({'PASS' if mem_ok else 'FAIL'} < 1 GiB)")
        else:
            ratio = f["time_s"] / n["time_s"]
            verdict = (f"{ratio:.2f}x {naive} time ({'PASS' if ratio <= 1.2 else 'FAIL'} <= 1.2x), "
                       f"memory {fmt_bytes(f['peak_bytes'])} ({'PASS' if mem_ok else 'FAIL'} < 1 GiB) vs "
                       f"{fmt_bytes(n['peak_bytes'])}")
        lines.append(f"- {fused} vs {naive}: {verdict}")
    return lines


def loss_table(rows: list[dict], device: str) -> list[str]:
    """Markdown table of the loss rows.

    Args:
        rows: loss rows.
        device: cpu or cuda (memory label).
    """
    mem = "peak CUDA mem above inputs" if device == "cuda" else "peak RSS growth (CPU)"
    lines = [f"| B=N | D | dtype | method | dir | time (ms) | runs | {mem} | GFLOP/s (8BND) | vs naive time "
             "| vs naive mem | loss |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = {(r["size"], r["method"]): r for r in rows if r.get("time_s") is not None}
    for r in rows:
        head = f"| {r['size']} | {r['dim']} | {r['dtype']} | {r['method']} | {LOSS_METHODS[r['method']][0]} |"
        if r.get("time_s") is None:
            lines.append(f"{head} {r.get('error') or 'skipped: ' + r.get('skipped', '?')} | - | - | - | - | - | - |")
            continue
        base = ref.get((r["size"], LOSS_METHODS[r["method"]][1]))
        vt = f"{r['time_s'] / base['time_s']:.2f}x" if base else "-"
        vm = f"{r['peak_bytes'] / base['peak_bytes']:.3f}x" if base and base["peak_bytes"] > 0 else "-"
        lines.append(f"{head} {r['time_s'] * 1e3:.1f} | {r['runs']} | {fmt_bytes(r['peak_bytes'])} | "
                     f"{r['gflops']:.0f} | {vt} | {vm} | {r['loss']:.5f} |")
    return lines


def train_table(rows: list[dict], args) -> list[str]:
    """Markdown table of the training-step rows.

    Args:
        rows: train rows.
        args: parsed CLI.
    """
    model = "BERT-tiny (quick)" if args.quick else "BERT-base"
    mem = "CUDA" if args.device == "cuda" else "RSS (CPU)"
    lines = [f"| model | pairs x tokens | precision | GradCache | step (s) | pairs/s | peak {mem} abs | "
             f"peak above model+optimiser | runs | loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gc_txt = f"chunk {r['chunk']} ({r.get('chunks', '?')} chunks)" if r["chunk"] else "off"
        head = f"| {model} (shared, random init) | {args.batch} x {args.seq} | bf16 autocast | {gc_txt} |"
        if r.get("time_s") is None:
            lines.append(f"{head} {r.get('error') or 'skipped: ' + r.get('skipped', '?')} | - | - | - | - | - |")
            continue
        lines.append(f"{head} {r['time_s']:.3f} | {r['pairs_per_s']:.0f} | {fmt_bytes(r['peak_abs_bytes'])} | "
                     f"{fmt_bytes(r['peak_bytes'])} | {r['runs']} | {r['loss']:.4f} |")
    return lines


def write_report(stem: Path, info: dict, loss_rows: list[dict], train_rows: list[dict], args) -> str:
    """Write ``stem``.json and .md; return the markdown.

    Args:
        stem: output path without suffix.
        info: ``machine_info`` plus run facts.
        loss_rows: loss measurements.
        train_rows: training-step measurements.
        args: parsed CLI.
    """
    where = (f"GPU {info['gpu']} ({info['gpu_mem_gib']} GiB), CUDA {info['cuda']}, TF32 matmul "
             f"{info['tf32_matmul']}" if args.device == "cuda" else f"CPU {info['cpu']}, {info['cores']} cores")
    md = [f"# gpu_check{' (CPU dry run)' if args.device == 'cpu' else ''}", "",
          f"Command: `{info['command']}`", "",
          f"Machine: {where}; torch {info['torch']}, transformers {info['transformers']}, "
          f"python {info['python']}; {info['date']}; {info.get('elapsed_s', 0):.0f} s in all.", "",
          f"Sources: clicktower {info['clicktower']}; sha256[:12] "
          + ", ".join(f"{k} {v}" for k, v in info["source_sha256_12"].items()) + ".", "",
          f"Train step driver: {info['accelerator']}. OpenCLIP copy: {info['openclip_check']}. "
          f"Forbidden imports loaded: {info.get('forbidden_imports_loaded') or 'none'}.", "",
          "## Loss: forward + backward", "",
          "Time: median of the measured runs after one warm-up run. Memory: "
          + ("CUDA max_memory_allocated above the allocation after making the inputs (loss working "
             "memory + input grads)." if args.device == "cuda" else
             "growth of the process's peak RSS (VmHWM) over its RSS before the run -- CPU only, coarse.")
          + " `vs naive`: fused against naive, fused_sym and openclip against naive_sym.", ""]
    md += loss_table(loss_rows, args.device) + [""] + target_lines(loss_rows, args)
    md += ["", "## Train step: TrainStep on a shared-tower TwoTower", "",
           "One optimiser step (forward, symmetric ContrastiveLoss, backward, clip 1.0, AdamW "
           f"implementation={args.optim_impl!r}, LR schedule) on one device; pairs/s = batch / median step time "
           f"after {args.train_warmup} warm-up steps.", ""]
    md += train_table(train_rows, args)
    text = "\n".join(md) + "\n"
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps({"machine": info, "loss": loss_rows, "train": train_rows}, indent=1))
    Path(f"{stem}.md").write_text(text)
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """CLI; ``--quick`` fills every size flag not given with tiny values.

    Args:
        argv: arguments (default: sys.argv[1:]).
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--sizes", help="B=N of the loss cases (default 16384,65536; quick 512,1024)")
    p.add_argument("--dim", type=int, help="embedding dim D (default 768; quick 64)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="loss input dtype")
    p.add_argument("--methods", default=",".join(LOSS_METHODS), help="loss methods to run")
    p.add_argument("--batch", type=int, help="train-step pairs (default 512; quick 32)")
    p.add_argument("--seq", type=int, help="tokens per query and per item (default 32; quick 8)")
    p.add_argument("--grad-cache-chunk", type=int, help="GradCache chunk in pairs (default 128; quick 8)")
    p.add_argument("--optim-impl", default="loop", choices=["loop", "foreach", "fused"],
                   help="OptimConfig.implementation (default: the project default, loop)")
    p.add_argument("--parts", default="loss,train", help="which parts to run")
    p.add_argument("--repeats", type=int, help="most timed loss runs per case (default 5; quick 3)")
    p.add_argument("--train-steps", type=int, help="most timed train steps (default 5; quick 3)")
    p.add_argument("--train-warmup", type=int, default=2, help="warm-up train steps")
    p.add_argument("--case-seconds", type=float, help="time budget per case for repeats (default 20; quick 3)")
    p.add_argument("--budget-s", type=float, default=330.0, help="skip cases that would start after this")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (default: PyTorch's default, off)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and a tiny BERT (CPU dry run)")
    p.add_argument("--out-dir", default=str(RESULTS), help="where gpu_check[_cpu_dryrun].{json,md} go")
    args = p.parse_args(argv)
    full = dict(sizes="16384,65536", dim=768, batch=512, seq=32, grad_cache_chunk=128, repeats=5,
                train_steps=5, case_seconds=20.0)
    quick = dict(sizes="512,1024", dim=64, batch=32, seq=8, grad_cache_chunk=8, repeats=3,
                 train_steps=3, case_seconds=3.0)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = set(args.methods.split(",")) - set(LOSS_METHODS)
    if unknown:
        p.error(f"unknown --methods {sorted(unknown)}; choose from {', '.join(LOSS_METHODS)}")
    return args


def run_case(fn, row: dict, started: float, args, device: torch.device) -> dict:
    """Run one case unless the script's time budget is spent; any failure becomes a row field.

    Args:
        fn: returns the measurement dict.
        row: the case's identity fields.
        started: perf_counter at the script's start.
        args: parsed CLI.
        device: for freeing memory afterwards.
    """
    if time.perf_counter() - started > args.budget_s:
        row["skipped"] = f"script time budget (--budget-s {args.budget_s:.0f}) spent"
        return row
    try:
        row.update(fn())
    except Exception as exc:  # one device call: record and go on
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    free_memory(device)
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the check and write the report.

    Args:
        argv: CLI arguments.

    Returns:
        Exit status (2 without the requested device).
    """
    started = time.perf_counter()
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device; for the CPU dry run use --device cpu --quick", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    source = import_clicktower()
    accelerator, accelerator_desc = make_accelerator(device)
    info = machine_info(device, source, accelerator_desc)
    info["command"] = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    info["openclip_check"] = check_openclip_copy()
    info["args"] = vars(args)
    stem = Path(args.out_dir) / ("gpu_check" if args.device == "cuda" else "gpu_check_cpu_dryrun")
    loss_rows, train_rows = [], []
    parts = args.parts.split(",")

    def report() -> str:
        info["elapsed_s"] = round(time.perf_counter() - started, 1)
        info["forbidden_imports_loaded"] = sorted(m for m in FORBIDDEN_IMPORTS if sys.modules.get(m) is not None)
        return write_report(stem, info, loss_rows, train_rows, args)

    for size in ([int(x) for x in args.sizes.split(",")] if "loss" in parts else []):
        for method in args.methods.split(","):
            row = {"size": size, "dim": args.dim, "dtype": args.dtype, "method": method,
                   "direction": LOSS_METHODS[method][0], "label": LOSS_METHODS[method][2]}
            loss_rows.append(run_case(lambda: loss_case(method, size, args, device), row, started, args, device))
            report()
    for chunk in ((None, args.grad_cache_chunk) if "train" in parts else ()):
        row = {"batch": args.batch, "seq": args.seq, "chunk": chunk}
        train_rows.append(run_case(lambda: train_case(chunk, args, accelerator, device), row, started, args, device))
        report()
    text = report()
    print(text)
    print(f"wrote {stem}.json and {stem}.md in {info['elapsed_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
