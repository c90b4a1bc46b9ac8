"""Scaling benchmark for distributed two-tower training, on 2 CPU ranks (gloo).

    .venv/bin/python benchmarks/bench_scaling.py [--quick]

Writes benchmarks/results/bench_scaling.json and .md. Three parts, each labelled
MEASURED (from tensors / timings on this machine) or COMPUTED (formula):

1. Per-rank memory of parameters, gradients and optimiser state for a shared-tower
   TwoTower on BERT-base and BERT-large (random init from BertConfig, fp32, AdamW) under
   ZeRO 0 (DDP) / 1 / 2 / 3 on 2 ranks: MEASURED as the byte sizes of the tensors each rank
   holds (module parameters or their ZeRO-3 partitions, .grad or ZeRO's gradient
   partitions after backward, fp32 master partitions and Adam moments after one step).
2. Global batch reachable at a fixed per-rank memory with and without GradCache: activation
   bytes per pair MEASURED (sizes of the tensors autograd saves in one forward, via
   saved_tensors_hooks), the reachable batch COMPUTED from them.
3. Time per step (forward + backward) of the cross-device loss against the local-only loss,
   MEASURED on 2 gloo ranks; extrapolation to 8 / 64 / 512 GPUs COMPUTED by formula.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
MIB = 2 ** 20


def _bert(spec: dict):
    from transformers import BertConfig, BertModel

    from clicktower.modeling.towers import Tower, TwoTower

    enc = BertModel(BertConfig(vocab_size=30522, max_position_embeddings=512, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0, **spec), add_pooling_layer=False)
    tower = Tower(enc, "mean", None, True)
    return TwoTower(tower, tower, 0.05, 100.0, True)


def _nbytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors if t is not None))


def _batch(n: int, seq: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (2, n, seq), generator=g)
    mask = torch.ones_like(ids)
    return {"query_input_ids": ids[0], "query_attention_mask": mask[0], "item_input_ids": ids[1],
            "item_attention_mask": mask[1]}


def _zero_worker(rank: int, world: int, port: int, name: str, stage: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from clicktower.modeling.losses import ContrastiveLoss

    torch.manual_seed(0)
    model = _bert(MODELS[name])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss_fn = ContrastiveLoss(True, True)
    psum = sum(p.numel() for p in model.parameters())
    rec = {"model": name, "stage": stage, "rank": rank, "num_params": psum}
    if stage == 0:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model)
        q, i, s = ddp(**_batch(2))
        loss_fn(q, i, s).backward()
        rec["params"] = _nbytes(model.parameters())
        rec["grads"] = _nbytes(p.grad for p in model.parameters())
        opt.step()
        rec["master_params"] = 0  # fp32 training: the parameters are the master copy
        rec["optim_moments"] = _nbytes(v for st in opt.state.values() for v in st.values()
                                       if torch.is_tensor(v) and v.dim() > 0)
    else:
        import deepspeed

        # On this direct deepspeed.initialize path DeepSpeed 0.19.8 broadcasts each parameter
        # as bytes (p.view(uint8)), which fails for the 0-dim logit-scale parameter; give it
        # one dimension here (memory accounting only; 4 bytes).
        from clicktower.modeling.towers import TwoTower

        model.log_logit_scale = torch.nn.Parameter(model.log_logit_scale.detach().reshape(1))
        TwoTower.logit_scale = lambda self: self.log_logit_scale.exp().clamp(max=self.max_logit_scale).reshape(())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        deepspeed.init_distributed(dist_backend="gloo")
        cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
               "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
               "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": stage > 1}}
        engine, zopt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        q, i, s = engine(**_batch(2))
        engine.backward(loss_fn(q, i, s))
        params = list(engine.module.parameters())
        rec["params"] = _nbytes(getattr(p, "ds_tensor", p) for p in params)
        if stage == 1:
            rec["grads"] = _nbytes(p.grad for p in params)
        elif stage == 2:
            rec["grads"] = _nbytes(t for group in zopt.averaged_gradients.values() for t in group)
        else:
            rec["grads"] = _nbytes(t.grad for t in zopt.fp32_partitioned_groups_flat)
        engine.step()
        if stage < 3:
            rec["master_params"] = _nbytes(zopt.single_partition_of_fp32_groups)
        else:
            rec["master_params"] = _nbytes(zopt.fp32_partitioned_groups_flat)
        rec["optim_moments"] = _nbytes(v for st in zopt.optimizer.state.values() for v in st.values()
                                       if torch.is_tensor(v) and v.dim() > 0)
    torch.save(rec, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(fn, *args) -> list:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(fn, args=(2, _free_port(), *args, out), nprocs=2, start_method="spawn")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(2)]


def zero_memory(models) -> list[dict]:
    rows = []
    for name in models:
        for stage in (0, 1, 2, 3):
            t0 = time.perf_counter()
            recs = _spawn(_zero_worker, name, stage)
            for rec in recs:
                rec["total"] = rec["params"] + rec["grads"] + rec["master_params"] + rec["optim_moments"]
            print(f"zero {name} stage {stage}: {recs[0]['total'] / MIB:.0f} MiB/rank "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            rows.append(recs[0] | {"rank1_total": recs[1]["total"]})
    return rows


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
        fn = ContrastiveLoss(True, cross)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="BERT-base only, fewer reps")
    args = ap.parse_args()
    t_start = time.perf_counter()
    models = ["bert-base"] if args.quick else ["bert-base", "bert-large"]
    out: dict = {"machine": machine(), "world_size_measured": 2}
    out["zero_memory_measured"] = zero_memory(models)

    seq = 32
    acts = {name: activation_bytes_per_pair(MODELS[name], seq) for name in ("bert-base",)}
    acts["small(256x4)"] = activation_bytes_per_pair(dict(hidden_size=256, num_hidden_layers=4,
                                                          num_attention_heads=4, intermediate_size=1024), seq)
    out["activation_bytes_per_pair_measured"] = {"seq_len_query_and_item": seq, **acts}
    budget, chunk, dim = 80 * 2 ** 30, 256, 768
    psi = next(r["num_params"] for r in out["zero_memory_measured"] if r["model"] == "bert-base")
    states = zero_formula(psi, 8, 2)  # ZeRO-2 on 8 GPUs, bf16
    per_pair_cache = 2 * dim * 4 * 3  # q, i embeddings + their cached gradients + fp32 loss copies
    act = acts["bert-base"] / 2  # measured in fp32; bf16 activations are about half
    out["reachable_batch_computed"] = {
        "assumptions": f"80 GiB per GPU, BERT-base shared tower ZeRO-2 on 8 GPUs (bf16 states "
                       f"{states / 2 ** 30:.2f} GiB), seq {seq}, bf16 activations = measured fp32 / 2, "
                       f"GradCache chunk {chunk}, D={dim}",
        "without_gradcache_per_rank": int((budget - states) / act),
        "with_gradcache_per_rank": int((budget - states - chunk * act) / per_pair_cache),
    }

    local, dim_loss = (1024, 256)
    reps = 3 if args.quick else 5
    recs = _spawn(_loss_worker, local, dim_loss, reps)
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
    out["zero_extrapolated_computed"] = [
        {"model": r_model, "gpus": n, **{f"zero{st}_gib": zero_formula(psi_m, n, st) / 2 ** 30 for st in range(4)}}
        for r_model, psi_m in {r["model"]: r["num_params"] for r in out["zero_memory_measured"]}.items()
        for n in (8, 64, 512)]
    out["runtime_s"] = time.perf_counter() - t_start
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_scaling.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "bench_scaling.md").write_text(markdown(out))
    print(markdown(out))


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = ["# bench_scaling", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; torch {m['torch']}, "
             f"deepspeed {m['deepspeed']}; {m['note']}. Runtime {out['runtime_s']:.0f} s.", "",
             "## Per-rank memory, 2 ranks, fp32 + AdamW (MEASURED from tensor sizes, MiB)", "",
             "| model | params | ZeRO | parameters | gradients | fp32 master | Adam moments | total rank 0 | total rank 1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in out["zero_memory_measured"]:
        lines.append(f"| {r['model']} | {r['num_params'] / 1e6:.0f}M | {r['stage']} | {r['params'] / MIB:.0f} | "
                     f"{r['grads'] / MIB:.0f} | {r['master_params'] / MIB:.0f} | {r['optim_moments'] / MIB:.0f} | "
                     f"{r['total'] / MIB:.0f} | {r['rank1_total'] / MIB:.0f} |")
    lines += ["", "## Per-rank memory extrapolated (COMPUTED, bf16 mixed precision, ZeRO paper formula, GiB)", "",
              "| model | GPUs | ZeRO-0 | ZeRO-1 | ZeRO-2 | ZeRO-3 |", "|---|---|---|---|---|---|"]
    for r in out["zero_extrapolated_computed"]:
        lines.append(f"| {r['model']} | {r['gpus']} | " + " | ".join(f"{r[f'zero{s}_gib']:.2f}" for s in range(4)) + " |")
    a = out["activation_bytes_per_pair_measured"]
    b = out["reachable_batch_computed"]
    lines += ["", "## Activation memory and reachable batch", "",
              f"MEASURED activation bytes per (query, item) pair, fp32, {a['seq_len_query_and_item']} tokens each: "
              + ", ".join(f"{k}: {v / MIB:.2f} MiB" for k, v in a.items() if k != "seq_len_query_and_item") + ".", "",
              f"COMPUTED ({b['assumptions']}): per-rank batch without GradCache "
              f"**{b['without_gradcache_per_rank']:,}** pairs, with GradCache **{b['with_gradcache_per_rank']:,}** "
              "pairs (then bounded by embeddings + cached gradients, not activations).", ""]
    s = out["loss_step_measured"]
    lines += ["## Loss step time (MEASURED, 2 CPU ranks, fwd+bwd, symmetric)", "",
              f"Local batch {s['local_batch']}, D={s['dim']}: local-only {s['local_only_s'] * 1e3:.1f} ms, "
              f"cross-device (global {2 * s['local_batch']}) {s['cross_device_s'] * 1e3:.1f} ms.", "",
              "Extrapolation (COMPUTED: time scales with b x W*b at this CPU's measured rate; a GPU is far faster, "
              "the ratio is what carries):", "", "| GPUs | global batch | cross-device loss s | gathered MiB/rank |",
              "|---|---|---|---|"]
    for r in out["loss_step_extrapolated_computed"]:
        lines.append(f"| {r['gpus']} | {r['global_batch']:,} | {r['cross_device_loss_s_at_this_cpu_speed']:.2f} | "
                     f"{r['gathered_bytes_per_rank'] / MIB:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
