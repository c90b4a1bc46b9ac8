"""Serving benchmark: what a smaller, quantised or approximate index costs in recall, against
exact float32 search, and what Matryoshka training, the loss's extra prefixes and ONNX cost.

    python benchmarks/bench_serving.py --section synthetic   # 1M x 384 planted catalog
    python benchmarks/bench_serving.py --section homedepot   # trains 2 models, 54,667 products
    python benchmarks/bench_serving.py --section loss        # Matryoshka loss vs one full-size loss
    python benchmarks/bench_serving.py --section onnx        # onnxruntime vs PyTorch encode
    python benchmarks/bench_serving.py --render              # serving.md from serving.json

Each section merges its results into ``benchmarks/results/serving.json`` (under its name, with
the machine and load at its start) and re-renders ``serving.md``. Serving code under test:
``clicktower.launcher.retrieval.serving`` (the one ``clicktower embed/eval/search`` run).

* synthetic: N (default 1,000,000) random unit 384-dim vectors; Q queries each get 10 planted
  neighbours (the query plus noise at cosine ~0.9 down to ~0.35; random pairs reach ~0.27 at
  1M), so the exact top 10 is mostly planted and the hardest ones sit near the random crowd.
  Per setting: build seconds, bytes per item (serialised index / N), p50/p99 of one-query
  searches (one FAISS thread), recall@10 against exact float32 search (flat float32, the
  baseline). Each index is built once; its search-time variants (nprobe, efSearch, rescoring)
  share it.
* homedepot: the data, split and recipe of ``benchmarks/homedepot.py`` (its functions, loaded
  from the file): one model trained plainly and one with ``loss.matryoshka_dims=[384, 256,
  128, 64]``, same pairs and seed (``--hd-skip-training``: neither), plus zero-shot MiniLM;
  Recall@10 (judged, relevance >= 2.67, reported split) at each dim x precision x index.
* loss: forward + backward of the symmetric training loss with 4 prefixes vs the full size
  only, alternating rounds; the embeddings come in as leaves (no encoder: its pass is shared).
* onnx: the MiniLM tower exported with ``clicktower.launcher.engine.onnx_export``; texts/s of
  onnxruntime vs PyTorch ``embed_texts`` on the same titles and batches, alternating rounds.
"""
from __future__ import annotations

import argparse
import datetime
import fcntl
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DIMS = (384, 256, 128, 64)
PRECISIONS = ("float32", "float16", "int8", "ubinary")
RESCORE_SWEEP = (1, 10, 40)
# ubinary candidates rescored against int8 vectors kept beside the index (--rescore int8).
INT8_RESCORE_SWEEP = (4, 10, 40)
# A multiplier past any catalog: every item rescored, the best rescoring can do (its bound).
RESCORE_ALL = 10**6


def log(message: str) -> None:
    print(f"[serving {time.strftime('%H:%M:%S')}] {message}", flush=True)


def machine() -> dict:
    load = os.getloadavg()
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "loadavg_1_5_15": [round(x, 2) for x in load], "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def save_section(name: str, result: dict, results_dir: Path) -> None:
    """Merge one section into serving.json (locked: sections may run side by side) and render."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "serving.json"
    with open(Path(tempfile.gettempdir()) / "clicktower-bench-serving.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[name] = result
        path.write_text(json.dumps(data, indent=1) + "\n")
        (results_dir / "serving.md").write_text(render(data))


# ---------------------------------------------------------------------------------------------
# Home Depot


def homedepot_module():
    # benchmarks/ is a folder of scripts: load homedepot.py itself for its data and recipe.
    spec = importlib.util.spec_from_file_location("homedepot_bench", REPO / "benchmarks" / "homedepot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def retrieval_grid(queries: np.ndarray, catalog: np.ndarray, ids: list[str], judged, min_relevance: float,
                   grid: list) -> list[dict]:
    """Recall@10 (judged) and recall@10 against exact search at the same size, per setting."""
    import torch

    from clicktower.launcher.retrieval.metrics import exact_topk, mean_metrics, query_metrics
    from clicktower.launcher.retrieval.serving import (build_index, index_bytes, overlap_at_k, prepare, rescore_bytes,
                                                       search_index)

    rows, exact_at = [], {}
    for settings in grid:
        dim = settings.dim or catalog.shape[1]
        if dim not in exact_at:
            exact_at[dim] = exact_topk(torch.from_numpy(prepare(queries, dim)), torch.from_numpy(prepare(catalog, dim)),
                                       10)[1].numpy()
        started = time.perf_counter()
        index = build_index(catalog, settings)
        build = time.perf_counter() - started
        _, top = search_index(index, settings, queries, 100)
        ranked = [[ids[r] for r in row if r >= 0] for row in top.tolist()]
        metrics = mean_metrics([query_metrics(r, g, min_relevance) for r, (_, g) in zip(ranked, judged)])
        if settings.precision == "ubinary":
            # Rescoring k x multiplier candidates: Recall@10 from a k=10 search (its 10 x
            # multiplier candidates, the recipe), not from the top 10 of the k=100 search.
            _, top = search_index(index, settings, queries, 10)
            ranked = [[ids[r] for r in row if r >= 0] for row in top.tolist()]
            metrics["recall@10"] = mean_metrics([query_metrics(r, g, min_relevance)
                                                 for r, (_, g) in zip(ranked, judged)])["recall@10"]
        rows.append({"dim": dim, "precision": settings.precision, "index": settings.index,
                     **({"rescore_multiplier": settings.rescore_multiplier, "rescore": settings.rescore,
                         "rescore_bytes_per_item": round(rescore_bytes(index) / len(ids), 1)}
                        if settings.precision == "ubinary" else {}),
                     "recall@10": round(metrics["recall@10"], 4), "recall@100": round(metrics["recall@100"], 4),
                     "recall@10_vs_exact": round(overlap_at_k(top, exact_at[dim]), 4),
                     "bytes_per_item": round(index_bytes(index) / len(ids), 1), "build_seconds": round(build, 2)})
        log(f"  {rows[-1]}")
    return rows


def homedepot_grid(size: str = "full") -> list:
    """The Home Depot settings: ``full`` (every precision, rescoring breadth and index), or
    ``dims`` (float32 and int8, flat, at each dim: the Matryoshka comparison, in minutes)."""
    from clicktower.launcher.retrieval.serving import ServingSettings

    if size == "dims":
        return [ServingSettings(dim=d, precision=p) for d in DIMS for p in ("float32", "int8")]
    grid = [ServingSettings(dim=d, precision=p) for d in DIMS for p in PRECISIONS]
    # Binary rescoring breadth: candidates per result (the default, RESCORE_MULTIPLIER, above).
    grid += [ServingSettings(dim=d, precision="ubinary", rescore_multiplier=m) for d in DIMS for m in RESCORE_SWEEP]
    grid.append(ServingSettings(dim=DIMS[0], precision="ubinary", rescore_multiplier=RESCORE_ALL))
    grid += [ServingSettings(dim=d, precision="ubinary", rescore_multiplier=m, rescore="int8")
             for d in DIMS for m in INT8_RESCORE_SWEEP]
    for d in DIMS:
        grid.append(ServingSettings(dim=d, index="hnsw:32", ef_search=128))
        grid.append(ServingSettings(dim=d, index=f"ivf-pq:256,{d // 8}", nprobe=32))
    grid.append(ServingSettings(dim=384, precision="int8", index="hnsw:32", ef_search=128))
    return grid


def trained_summary(model: Path) -> dict:
    """How a model given by ``--hd-models`` was trained, read from its run folder (the
    ``config.yaml`` and ``metrics.jsonl`` beside its ``final/``): steps, batch, pairs seen,
    the Matryoshka prefixes and weights; empty for a folder that is not a clicktower run's."""
    import yaml

    run = model.parent
    if not (run / "config.yaml").is_file() or not (run / "metrics.jsonl").is_file():
        return {}
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    steps = max(json.loads(line).get("step", 0) for line in (run / "metrics.jsonl").read_text().splitlines()
                if line.strip())
    batch = cfg["train"]["batch_size"]
    return {"steps": steps, "batch": batch, "pairs_seen": steps * batch, "lr": cfg["optim"]["lr"],
            "seed": cfg["train"].get("seed"),
            "matryoshka_dims": cfg["loss"].get("matryoshka_dims"),
            "matryoshka_weights": cfg["loss"].get("matryoshka_weights"),
            "projection": None if not cfg["model"].get("projection_dim") else
            f"{cfg['model']['projection_dim']}, {cfg['model'].get('projection_init', 'random')} init"}


def section_homedepot(args: argparse.Namespace) -> dict:
    """Train plain + Matryoshka models on Home Depot, then the grid for them and zero-shot."""
    from clicktower.launcher.retrieval.embedding import embed_texts
    from clicktower.launcher.retrieval.readers import load_towers

    hd = homedepot_module()
    hd_args = argparse.Namespace(
        data=str(hd.DEFAULT_DATA), max_pairs=args.hd_max_pairs, reported_queries=args.hd_reported_queries,
        tuning_queries=500,
        tuning_distractors=1000, batch_size=64, max_seq_length=32, lr=5e-5, split_seed=0, evals_per_run=1,
        graded_weight=0.0, mine_negatives=0, separate_towers=False, catalog_limit=args.hd_catalog_limit, set=[])
    out = Path(args.work) / "homedepot"
    out.mkdir(parents=True, exist_ok=True)
    d = hd.load_data(hd_args)
    shards = hd.write_training_shards(d["pairs"], out)
    tuning = hd.write_tuning_files(d, out / "tuning")
    steps = len(d["pairs"]) // hd_args.batch_size
    models = {}
    training = {}
    # No tuning evaluations (their time goes to training): final/ is the model reported.
    variants = [("plain", ["eval.every_steps=null"]),
                ("matryoshka", ["eval.every_steps=null", f"loss.matryoshka_dims=[{', '.join(map(str, DIMS))}]"])]
    if args.hd_models:  # models trained before (by a run of this section): the grid alone
        models.update(spec.split("=", 1) for spec in args.hd_models)
        training = {name: trained_summary(Path(folder)) for name, folder in models.items()}
    for name, extra in variants if not (args.hd_skip_training or args.hd_models) else []:
        hd_args.set = extra
        log(f"training {name} ({len(d['pairs'])} pairs, {steps} steps)")
        chosen, figures = hd.train_clicktower(hd_args, shards, out / f"run_{name}", 0, steps, True, tuning)
        for stale in out.glob(f"embeddings_{name}_*.npz"):  # a new model: its old vectors are stale
            stale.unlink()
        models[name] = str(chosen)
        training[name] = {k: figures[k] for k in ("train_seconds", "steps", "step_seconds") if k in figures}
        log(f"{name}: {training[name]}")
    if not args.hd_no_zero_shot:
        models["zero-shot MiniLM"] = hd.MODEL
    grids = {}
    result = {"pairs": len(d["pairs"]), "steps": steps, "catalog_items": len(d["ids"]),
              "full_catalog": d["full_catalog"], "reported_queries": len(d["reported"]), "training": training,
              "models": [], "grid": grids, **({"model_folders": dict(models)} if args.hd_models else {})}
    for name, model in models.items():
        cache = out / f"embeddings_{name.replace(' ', '_')}_{len(d['ids'])}.npz"  # re-runs of the grid alone
        if not cache.is_file():
            query_tower, item_tower, tokenizer = load_towers(model)
            started = time.perf_counter()
            catalog = embed_texts(item_tower, tokenizer, d["texts"], 32, 256).numpy()
            queries = embed_texts(query_tower, tokenizer, [q for q, _ in d["reported"]], 32, 256).numpy()
            log(f"{name}: embedded {len(catalog)} items and {len(queries)} queries in "
                f"{time.perf_counter() - started:.0f} s")
            np.savez(cache, catalog=catalog, queries=queries, model=str(model))
        if args.hd_embed_only:
            continue
        saved = np.load(cache)
        catalog, queries = saved["catalog"], saved["queries"]
        grids[name] = retrieval_grid(queries, catalog, d["ids"], d["reported"], hd.POSITIVE,
                                     homedepot_grid(args.hd_grid))
        result["models"].append(name)
        save_section(args.hd_name, {**result, "partial": True, "machine": machine(), "command": args.command},
                     Path(args.results_dir))
    return result


# ---------------------------------------------------------------------------------------------
# Synthetic 1M


def planted_catalog(n: int, queries: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random unit vectors; query i's 10 planted neighbours are rows i*10 .. i*10+9 (query plus
    Gaussian noise, cosine ~0.9 down to ~0.35), spread over the catalog by a permutation."""
    rng = np.random.default_rng(seed)
    catalog = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        block = rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32)
        catalog[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    q = rng.standard_normal((queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    noise = np.linspace(0.5, 2.7, 10, dtype=np.float32)  # cosine 1/sqrt(1 + s^2): 0.89 .. 0.35
    rows = rng.permutation(n)[:queries * 10].reshape(queries, 10)
    for j in range(10):
        v = q + noise[j] * rng.standard_normal((queries, dim), dtype=np.float32) / np.sqrt(dim)
        catalog[rows[:, j]] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return catalog, q, rows


def synthetic_grid(name: str = "default") -> list:
    """(build settings, search-time variants): each index is built once. ``deep``: flat (the
    exact baseline) and IVF-PQ with 4 dims per PQ byte, searched deeper; ``rescore``: flat and
    ubinary rescored against its bits or against int8 vectors read back memory-mapped."""
    from clicktower.launcher.retrieval.serving import ServingSettings

    if name == "rescore":
        return [(ServingSettings(), [{}]),
                (ServingSettings(precision="ubinary"), [{"rescore_multiplier": m} for m in (4, 10)]),
                (ServingSettings(precision="ubinary", rescore="int8"), [{"rescore_multiplier": m} for m in (4, 10)])]
    if name == "deep":
        return [(ServingSettings(), [{}]),
                (ServingSettings(index="ivf-pq:1024,96", train_sample=50_000), [{"nprobe": n} for n in (128, 512)])]
    return [(ServingSettings(), [{}]), (ServingSettings(precision="int8"), [{}]),
            (ServingSettings(precision="ubinary"), [{"rescore_multiplier": m} for m in (1, 4, 10)]),
            (ServingSettings(index="ivf-pq:1024,48", train_sample=50_000), [{"nprobe": n} for n in (16, 64)]),
            (ServingSettings(precision="float16"), [{}]),
            (ServingSettings(index="hnsw:16"), [{"ef_search": e} for e in (32, 128)])]


def section_synthetic(args: argparse.Namespace) -> dict:
    import dataclasses

    from clicktower.launcher.retrieval.serving import (build_index, index_bytes, latency_ms, overlap_at_k,
                                                       read_index, rescore_bytes, search_index, write_index)

    started = time.perf_counter()
    catalog, queries, planted = planted_catalog(args.synthetic_n, args.synthetic_queries, 384)
    log(f"catalog {catalog.shape} in {time.perf_counter() - started:.0f} s")
    exact = None
    rows = []
    grid = synthetic_grid(args.synthetic_grid)
    if args.synthetic_only:  # the first entry (flat float32: exact search) always stays
        grid = grid[:1] + [g for g in grid[1:] if any(g[0].index.startswith(x) or g[0].precision == x
                                                      for x in args.synthetic_only)]
    for built, variants in grid:
        started = time.perf_counter()
        index = build_index(catalog, built)
        build = time.perf_counter() - started
        scratch = None
        if built.rescore == "int8":
            os.makedirs(args.work, exist_ok=True)  # served as clicktower search serves it: int8 vectors memory-mapped
            scratch = tempfile.mkdtemp(prefix="bench-serving-", dir=args.work)
            write_index(index, os.path.join(scratch, "index.faiss"))
            index = read_index(os.path.join(scratch, "index.faiss"), built)
        for variant in variants:
            settings = dataclasses.replace(built, **variant)
            _, top = search_index(index, settings, queries, 10)
            if exact is None:
                exact = top  # the first setting is flat float32: exact search itself
            lat = latency_ms(index, settings, queries[:args.latency_queries], 10)
            rows.append({"precision": settings.precision, "index": settings.index, **variant,
                         **({"rescore": settings.rescore} if settings.precision == "ubinary" else {}),
                         "bytes_per_item": round(index_bytes(index) / len(catalog), 1),
                         "rescore_bytes_per_item": round(rescore_bytes(index) / len(catalog), 1),
                         "build_seconds": round(build, 1),
                         "p50_ms": round(lat["p50_ms"], 3), "p99_ms": round(lat["p99_ms"], 3),
                         "recall@10_vs_exact": round(overlap_at_k(top, exact), 4)})
            log(f"  {rows[-1]}")
        del index
        if scratch:
            shutil.rmtree(scratch)
        found = np.mean([len(set(e.tolist()) & set(p.tolist())) / 10 for e, p in zip(exact, planted)])
        result = {"n": args.synthetic_n, "dim": 384, "queries": args.synthetic_queries,
                  "latency_queries": args.latency_queries, "planted_share_of_exact_top10": round(float(found), 4),
                  "faiss_threads": _faiss_threads(), "rows": rows}
        # Saved after every index: a run stopped early keeps what it measured (marked partial).
        save_section(args.synthetic_name, {**result, "partial": True, "machine": machine(), "command": args.command},
                     Path(args.results_dir))
    return result


def _faiss_threads() -> int:
    import faiss

    return faiss.omp_get_max_threads()


# ---------------------------------------------------------------------------------------------
# Matryoshka loss cost


def section_loss(args: argparse.Namespace) -> dict:
    """Forward + backward of the symmetric ContrastiveLoss, full size only vs 4 prefixes."""
    import torch

    from clicktower.data.batch import PairLabels
    from clicktower.modeling.losses import ContrastiveLoss

    torch.manual_seed(0)
    b, d = args.loss_batch, 384
    q = torch.nn.functional.normalize(torch.randn(b, d), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(b, d), dim=-1)
    labels = PairLabels(item_ids=torch.randint(0, 1 << 40, (b,)), query_ids=torch.randint(0, 1 << 40, (b,)))
    losses = {"full": ContrastiveLoss(), "matryoshka": ContrastiveLoss(matryoshka_dims=list(DIMS)),
              # One prefix alone: what one pass costs at that size (the B x N softmax work does not shrink).
              **{f"only_{d}": ContrastiveLoss(matryoshka_dims=[d]) for d in DIMS[1:]}}
    times = {name: [] for name in losses}
    for _ in range(args.loss_rounds):
        for name, loss_fn in losses.items():
            qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
            started = time.perf_counter()
            loss_fn(qq, kk, torch.tensor(20.0), labels).backward()
            times[name].append(time.perf_counter() - started)
    med = {name: statistics.median(t) for name, t in times.items()}
    ratios = [m / f for m, f in zip(times["matryoshka"], times["full"])]
    return {"batch": b, "dim": d, "dims": list(DIMS), "rounds": args.loss_rounds,
            "torch_threads": torch.get_num_threads(),
            "median_ms": {name: round(v * 1000, 2) for name, v in med.items()},
            "ratio_of_medians": round(med["matryoshka"] / med["full"], 3),
            "median_of_ratios": round(statistics.median(ratios), 3),
            "flop_ratio": round(sum(DIMS) / d, 3)}


# ---------------------------------------------------------------------------------------------
# ONNX


def section_onnx(args: argparse.Namespace) -> dict:
    """Texts/s of the exported MiniLM tower in onnxruntime (plain and fused graphs) vs PyTorch,
    same titles and batches, alternating rounds; then where each spends its time."""
    import torch

    from clicktower.launcher.engine.onnx_export import OnnxEncoder, export_tower_onnx
    from clicktower.launcher.retrieval.embedding import embed_texts
    from clicktower.launcher.retrieval.readers import load_towers

    hd = homedepot_module()
    texts = [t for _, t in hd.read_catalog(Path(hd.DEFAULT_DATA))][:args.onnx_texts]
    tower, _, tokenizer = load_towers(hd.MODEL)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        fusions = {}
        for name, fused in (("onnxruntime", False), ("onnxruntime fused", True)):
            fusions[name] = export_tower_onnx(tower, tokenizer, Path(tmp) / f"{fused}.onnx", 32, fused)
        encoders = {name: OnnxEncoder(Path(tmp) / f"{name.endswith('fused')}.onnx", tokenizer, 32, threads=threads)
                    for name in fusions}
        runs = {"torch": lambda t: embed_texts(tower, tokenizer, t, 32, 128).numpy(),
                **{name: (lambda t, e=e: e.encode(t, 128)) for name, e in encoders.items()}}
        want = runs["torch"](texts[:256])
        diff = {name: float(np.abs(runs[name](texts[:256]) - want).max()) for name in encoders}
        times = {name: [] for name in runs}
        for _ in range(args.onnx_rounds):
            for name, run in runs.items():
                started = time.perf_counter()
                run(texts)
                times[name].append(time.perf_counter() - started)
        profile = {"torch": _torch_profile(runs["torch"], texts[:args.onnx_profile_texts]),
                   **{name: _ort_profile(Path(tmp) / f"{name.endswith('fused')}.onnx", tokenizer, threads,
                                         texts[:args.onnx_profile_texts]) for name in encoders}}
    rate = {k: round(len(texts) / statistics.median(v), 1) for k, v in times.items()}
    return {"texts": len(texts), "max_length": 32, "batch": 128, "threads": threads, "rounds": args.onnx_rounds,
            "texts_per_s": rate, "speedup": {k: round(v / rate["torch"], 3) for k, v in rate.items() if k != "torch"},
            "max_abs_diff": diff, "fused_operators": fusions["onnxruntime fused"], "profile": profile,
            "onnxruntime": _version("onnxruntime"), "torch": torch.__version__}


# Matrix products: the projections and feed-forward layers (and, unfused, attention's QK^T, AV).
_TORCH_GEMM = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm")
_ORT_GEMM = ("MatMul", "Gemm", "FusedMatMul", "MatMulAddFusion")


def _torch_profile(run, texts: list[str]) -> dict:
    """Operator self time of PyTorch encoding ``texts`` and the matrix products' share."""
    from torch.profiler import ProfilerActivity, profile

    run(texts[:8])  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(texts)
    ops = {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}
    return _profile_summary(ops, lambda op: op in _TORCH_GEMM)


def _ort_profile(path: Path, tokenizer, threads: int, texts: list[str]) -> dict:
    """Node time of onnxruntime encoding ``texts`` (its own profiler) and the MatMuls' share;
    the fused Attention node holds its QKV projection and QK^T / AV products, counted apart."""
    import onnxruntime as ort

    from clicktower.launcher.engine.onnx_export import OnnxEncoder

    encoder = OnnxEncoder(path, tokenizer, 32, threads=threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    encoder.encode(texts[:8])
    encoder.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    encoder.encode(texts)
    events = json.loads(Path(encoder.session.end_profiling()).read_text())
    ops: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            ops[op] = ops.get(op, 0.0) + event["dur"] / 1000
    return _profile_summary(ops, lambda op: op in _ORT_GEMM)


def _profile_summary(ops: dict[str, float], is_gemm) -> dict:
    total = sum(ops.values())
    gemm = sum(v for k, v in ops.items() if is_gemm(k))
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:6]
    return {"op_ms": round(total, 1), "gemm_ms": round(gemm, 1), "gemm_share": round(gemm / total, 3),
            "top_ops_ms": {k: round(v, 1) for k, v in top}}


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# ---------------------------------------------------------------------------------------------
# Report


def render(data: dict) -> str:
    lines = ["# Serving: size, precision and index against exact search", "",
             "Written by `benchmarks/bench_serving.py` (sections run separately; each records its machine "
             "and load). Baseline everywhere: exact float32 search of the whole embedding.", ""]
    renderers = {"synthetic": _render_synthetic, "homedepot": _render_homedepot, "loss": _render_loss,
                 "onnx": _render_onnx}
    for name in sorted(data, key=lambda n: list(renderers).index(n.split("_")[0])):
        r = data[name]
        said = f"Command: `{r['command']}`. " if r.get("command") else ""
        partial = "Partial: the run was stopped before its end; these rows are what it measured. " if r.get(
            "partial") else ""
        body = renderers[name.split("_")[0]](r)
        body[0] += f" [`{name}`]"
        lines += body + [f"{said}{partial}Machine: `{json.dumps(r.get('machine', {}))}`", ""]
    return "\n".join(lines)


def _render_synthetic(r: dict) -> list[str]:
    base = r["rows"][0]
    out = [f"## Synthetic: {r['n']:,} random unit {r['dim']}-dim vectors, planted neighbours", "",
           f"{r['queries']} queries, 10 planted neighbours each (cosine ~0.9 down to ~0.35; they are "
           f"{r['planted_share_of_exact_top10']:.1%} of the exact top 10). Latency: one query at a time over "
           f"{r['latency_queries']} queries, FAISS threads {r['faiss_threads']}.", "",
           "| precision | index | search params | bytes/item | x fewer bytes | build s | p50 ms | p99 ms | "
           "x lower p50 | recall@10 vs exact |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        params = ", ".join(f"{k}={row[k]}" for k in ("nprobe", "ef_search", "rescore_multiplier", "rescore")
                           if k in row)
        out.append(f"| {row['precision']} | {row['index']} | {params or '-'} | {row['bytes_per_item']} | "
                   f"{base['bytes_per_item'] / row['bytes_per_item']:.1f} | {row['build_seconds']} | {row['p50_ms']} | "
                   f"{row['p99_ms']} | {base['p50_ms'] / row['p50_ms']:.1f} | {row['recall@10_vs_exact']:.4f} |")
    if any(row.get("rescore_bytes_per_item") for row in r["rows"]):
        out += ["", "rescore=int8: bytes/item is the binary index held in memory; the int8 vectors its candidates "
                "are rescored against are a memory-mapped file beside it (`rescore_bytes_per_item` in the JSON: "
                "1 byte per dimension), read back from disk before the searches (warm in the page cache here)."]
    return out + [""]


def _render_homedepot(r: dict) -> list[str]:
    sub = "" if r["catalog_items"] == r.get("full_catalog", r["catalog_items"]) else (
        f" (a subsample of the {r['full_catalog']:,}: every judged item of the reported and tuning queries, plus "
        "the catalog's first N items with --hd-catalog-limit N > 0)")
    out = [f"## Home Depot: {r['catalog_items']:,} products{sub}, {r['reported_queries']:,} reported queries", "",
           f"Recall@10: judged (relevance >= 2.67), retrieval over these products; in brackets recall@10 against "
           f"exact float32 search at the same dim. Models: {', '.join(r['models'])}{_models_trained(r)}", ""]
    names = r["models"]
    out += ["| dim | precision | index | bytes/item | " + " | ".join(f"{n} R@10 (vs exact)" for n in names) + " |",
            "|---|---|---|---|" + "---|" * len(names)]
    first = r["grid"][names[0]]
    for i, row in enumerate(first):
        cells = [f"{r['grid'][n][i]['recall@10']:.4f} ({r['grid'][n][i]['recall@10_vs_exact']:.3f})" for n in names]
        multiplier = row.get("rescore_multiplier")
        precision = row["precision"] + ("" if multiplier is None else " x all" if multiplier >= RESCORE_ALL
                                        else f" x{multiplier}") + (" int8" if row.get("rescore") == "int8" else "")
        out.append(f"| {row['dim']} | {precision} | {row['index']} | {row['bytes_per_item']} | "
                   + " | ".join(cells) + " |")
    out += ["", "ubinary xM: Hamming top 10 x M rescored with the float query (Recall@10 from a k=10 search); "
            "x all: every item rescored (the float query against every binary vector: rescoring's bound); "
            "int8: rescored against int8 vectors kept beside the index on disk (their bytes per item: "
            "`rescore_bytes_per_item` in the JSON; the bytes/item column is what the index holds in memory).", ""]
    return out + _homedepot_targets(r) + [""]


def _models_trained(r: dict) -> str:
    """How the section's models were trained, as a clause of the table's caption."""
    summaries = {name: t for name, t in r["training"].items() if "pairs_seen" in t}
    if summaries:  # given by --hd-models, read from their run folders (trained_summary)
        def words(t: dict) -> str:
            prefixes = "" if not t["matryoshka_dims"] else (
                f", Matryoshka {t['matryoshka_dims']}" + (f" weights {t['matryoshka_weights']}"
                                                          if t["matryoshka_weights"] else " (equal weights)"))
            projection = f", projection {t['projection']}" if t.get("projection") else ""
            seed = f", seed {t['seed']}" if t.get("seed") is not None else ""
            return (f"{t['pairs_seen']:,} pairs ({t['steps']} steps of {t['batch']}, lr {t['lr']}{seed}{prefixes}"
                    f"{projection})")
        seeds = "" if any(t.get("seed") is not None for t in summaries.values()) else ", seed 0"
        return (f"; trained beforehand with this section's recipe (length 32{seeds}, final/ reported): "
                + "; ".join(f"{name} {words(t)}" for name, t in summaries.items()) + ".")
    if r["training"]:
        return (f"; trained ones: {r['pairs']:,} pairs, {r['steps']} steps, batch 64, length 32, the homedepot.py "
                f"recipe without its tuning evaluations (final/ reported), seed 0 (training seconds: "
                f"{json.dumps(r['training'])}).")
    if r.get("model_folders"):
        return (f"; trained beforehand with this section's recipe ({r['pairs']:,} pairs, {r['steps']} steps, batch 64, "
                f"length 32, seed 0): {json.dumps(r['model_folders'])}.")
    return " (no model trained in this run)."


def _homedepot_targets(r: dict) -> list[str]:
    """The issue's Home Depot targets, read off the grid: each dim's Recall@10 against the
    model's full size (flat float32), and each precision's against float32 at the same dim."""
    out = ["| model | dim | float32 flat R@10 | vs full dim | int8 vs float32 | ubinary x1 / x4 / x10 / x40 / x all "
           "vs float32 | ubinary int8-rescored x4 / x10 / x40 vs float32 |", "|---|---|---|---|---|---|---|"]
    for name in r["models"]:
        # (dim, precision, multiplier, rescored against); rows from before --rescore: the bits.
        flat = {(row["dim"], row["precision"], row.get("rescore_multiplier"),
                 row.get("rescore", "bits" if row["precision"] == "ubinary" else None)): row["recall@10"]
                for row in r["grid"][name] if row["index"] == "flat"}
        full = max(key[0] for key in flat)

        def lost(dim: int, multipliers: tuple, rescore: str, f32: float) -> str:
            return " / ".join(f"{flat[(dim, 'ubinary', m, rescore)] - f32:+.4f}"
                              if (dim, "ubinary", m, rescore) in flat else "-" for m in multipliers)

        for dim in sorted({key[0] for key in flat}, reverse=True):
            f32 = flat[(dim, "float32", None, None)]
            out.append(f"| {name} | {dim} | {f32:.4f} | {f32 - flat[(full, 'float32', None, None)]:+.4f} | "
                       f"{flat[(dim, 'int8', None, None)] - f32:+.4f} | "
                       f"{lost(dim, (1, 4, 10, 40, RESCORE_ALL), 'bits', f32)} | "
                       f"{lost(dim, INT8_RESCORE_SWEEP, 'int8', f32)} |")
    return ["Targets: Matryoshka model within 0.01 of its full-size Recall@10 at 128 dims; int8 <= 0.003 lost; "
            "ubinary with rescoring <= 0.01 lost (differences in Recall@10, negative = lost):", ""] + out


def _render_loss(r: dict) -> list[str]:
    return [f"## Matryoshka loss cost (batch {r['batch']}, dim {r['dim']}, prefixes {r['dims']})", "",
            f"Forward + backward of the symmetric training loss on leaf embeddings, {r['rounds']} alternating "
            f"rounds, {r['torch_threads']} torch threads: full size only {r['median_ms']['full']} ms, "
            f"Matryoshka {r['median_ms']['matryoshka']} ms (median); ratio of medians {r['ratio_of_medians']}, "
            f"median of per-round ratios {r['median_of_ratios']} (matmul FLOP ratio sum(dims)/384 = "
            f"{r['flop_ratio']}). One prefix alone: "
            + ", ".join(f"{k[5:]} dims {v} ms" for k, v in r["median_ms"].items() if k.startswith("only_"))
            + " (the B x N exponentials and masks of a pass do not shrink with the size). The encoder's "
            "forward and backward, shared by every prefix, are not in this figure.", ""]


def _render_onnx(r: dict) -> list[str]:
    rates = r["texts_per_s"]
    out = [f"## ONNX vs PyTorch encode (MiniLM, {r['texts']:,} Home Depot titles, length {r['max_length']}, "
           f"batch {r['batch']}, {r['threads']} threads)", "",
           "| runtime | texts/s | vs PyTorch | max abs diff vs PyTorch |", "|---|---|---|---|",
           f"| PyTorch {r['torch']} | {rates['torch']} | x1 | - |"]
    for name, rate in rates.items():
        if name != "torch":
            out.append(f"| {name} {r['onnxruntime']} | {rate} | x{r['speedup'][name]} | {r['max_abs_diff'][name]:.1e} |")
    out += ["", f"Median of {r['rounds']} alternating rounds. Fused graph: "
            + ", ".join(f"{n} {op}" for op, n in r["fused_operators"].items()) + ".", "",
            "Where the time goes (each runtime's own profiler, one pass over "
            "the profiled titles; operator time, tokenisation not included):", "",
            "| runtime | operator ms | matrix products ms | share | largest operators (ms) |", "|---|---|---|---|---|"]
    for name, p in r["profile"].items():
        top = ", ".join(f"{op} {ms}" for op, ms in p["top_ops_ms"].items())
        out.append(f"| {name} | {p['op_ms']} | {p['gemm_ms']} | {p['gemm_share']:.0%} | {top} |")
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--section", choices=("synthetic", "homedepot", "loss", "onnx"), action="append", default=[])
    p.add_argument("--render", action="store_true", help="only re-render serving.md from serving.json")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--work", default="/tmp/bench_serving", help="scratch folder (runs, models)")
    p.add_argument("--synthetic-n", type=int, default=1_000_000)
    p.add_argument("--synthetic-queries", type=int, default=1000)
    p.add_argument("--synthetic-only", nargs="*", help="only settings whose index or precision starts so")
    p.add_argument("--latency-queries", type=int, default=200)
    p.add_argument("--synthetic-grid", choices=("default", "deep", "rescore"), default="default")
    p.add_argument("--synthetic-name", default="synthetic", help="the results key of this synthetic run")
    p.add_argument("--hd-max-pairs", type=int, default=10240)
    p.add_argument("--hd-catalog-limit", type=int, default=None, help="smoke runs only")
    p.add_argument("--hd-skip-training", action="store_true", help="zero-shot MiniLM only")
    p.add_argument("--hd-no-zero-shot", action="store_true", help="trained models only")
    p.add_argument("--hd-embed-only", action="store_true",
                   help="only embed (cached in --work for a later run of the grid; one process per model): no results")
    p.add_argument("--hd-models", nargs="*", metavar="NAME=FOLDER",
                   help="no training: these models (run_<name>/final of an earlier run) instead")
    p.add_argument("--hd-reported-queries", type=int, default=2000)
    p.add_argument("--hd-grid", choices=("full", "dims"), default="full",
                   help="dims: float32 and int8 flat at each dim only (the Matryoshka comparison)")
    p.add_argument("--hd-name", default="homedepot", help="the results key of this Home Depot run")
    p.add_argument("--loss-batch", type=int, default=1024)
    p.add_argument("--loss-rounds", type=int, default=7)
    p.add_argument("--onnx-texts", type=int, default=2048)
    p.add_argument("--onnx-rounds", type=int, default=3)
    p.add_argument("--onnx-profile-texts", type=int, default=512, help="texts each runtime is profiled on")
    args = p.parse_args(argv)
    results_dir = Path(args.results_dir)
    if args.render:
        (results_dir / "serving.md").write_text(render(json.loads((results_dir / "serving.json").read_text())))
        return 0
    import faiss

    # One FAISS thread: on this shared 2-core machine OpenMP's spinning threads made IVF-PQ
    # training 8x slower and one flat query 7x slower than one thread did.
    faiss.omp_set_num_threads(1)
    args.command = "python benchmarks/bench_serving.py " + " ".join(sys.argv[1:] if argv is None else argv)
    sections = {"synthetic": section_synthetic, "homedepot": section_homedepot, "loss": section_loss,
                "onnx": section_onnx}
    for name in args.section:
        info = machine()
        started = time.perf_counter()
        result = sections[name](args)
        if name == "homedepot" and args.hd_embed_only:
            continue  # vectors cached in --work; no results until the grid runs
        result["machine"] = {**info, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                             "section_seconds": round(time.perf_counter() - started, 1)}
        result["command"] = args.command
        key = {"homedepot": args.hd_name, "synthetic": args.synthetic_name}.get(name, name)
        save_section(key, result, results_dir)
        log(f"{name} done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
