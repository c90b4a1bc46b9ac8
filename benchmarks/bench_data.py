"""Benchmark: the clicktower data engine (shard writing, indexed reading) vs plain webdataset.

One run measures, on synthetic pairs from ``clicktower.data.synth.generate``:

* shard writing throughput (pairs/s), 1 vs N writer processes (the input cut into ranges of
  ``--split-bytes``, each read by one writer), plain tar and .tar.gz;
* reader throughput of ``ClickPairLoader`` (batch 512, one rank): decode-only and
  decode+tokenise (MiniLM fast tokenizer, max 32/64 tokens), in-process (0 workers = one
  reader) and with 1, 2 and 4 DataLoader worker processes;
* the same epoch through a plain webdataset pipeline (``wds.WebDataset`` with
  ``split_by_node``, ``split_by_worker``, a 1000-sample shuffle buffer, ``.decode()``,
  batches of 512) as the baseline;
* peak reader memory (fresh subprocess, ``ru_maxrss``) with a manifest of 10,000 shards
  against 10 shards holding the same samples, and the Python heap the manifest and loader
  keep (``tracemalloc``, a second fresh subprocess).

    python benchmarks/bench_data.py             # ~5-8 min on 2 cores
    python benchmarks/bench_data.py --quick     # smoke run
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import minilm_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 512


def bench_write(src: str, work: Path, workers: int, gzip: bool, shard_size: int,
                split_bytes: int) -> dict:
    from clicktower.data.shards import write_shards
    from clicktower.data.sources import FieldMap

    out = work / f"w{workers}{'gz' if gzip else ''}"
    load = os.getloadavg()[0]
    cpu0 = _cpu_seconds()
    t = time.perf_counter()
    m = write_shards([src], str(out), FieldMap(), shard_size=shard_size, workers=workers, gzip=gzip,
                     split_bytes=split_bytes)
    dt = time.perf_counter() - t
    cpu = _cpu_seconds() - cpu0
    size = sum(s["bytes"] for s in m["shards"])
    return {"workers": workers, "gzip": gzip, "pairs": m["num_samples"], "seconds": round(dt, 2),
            "pairs_per_s": round(m["num_samples"] / dt), "shards": len(m["shards"]),
            "ranges": m["num_ranges"], "load_before": round(load, 1), "cpu_seconds": round(cpu, 2),
            "bytes_per_pair": round(size / m["num_samples"], 1), "dir": str(out)}


def bench_csv(src: str, work: Path, workers: int, shard_size: int, split_bytes: int) -> dict:
    """The same pairs as a CSV: the serial record-boundary parse that splits it
    (``split_input``) against writing it with 1 and N writers."""
    import csv

    from clicktower.data.sources import split_input

    path = work / "pairs.csv"
    with open(src, encoding="utf-8") as fin, open(path, "w", encoding="utf-8", newline="") as fout:
        writer = csv.writer(fout)
        writer.writerow(["query", "item_id", "item_text"])
        for line in fin:
            rec = json.loads(line)
            writer.writerow([rec["query"], rec["item_id"], rec["item_text"]])
    t = time.perf_counter()
    parts = split_input(str(path), split_bytes)
    split_s = time.perf_counter() - t
    row = {"csv_bytes": path.stat().st_size, "ranges": len(parts), "split_seconds": round(split_s, 2)}
    for w in (1, workers):
        r = bench_write(str(path), work, w, False, shard_size, split_bytes)
        shutil.rmtree(r["dir"])
        row[f"write_{w}_seconds"], row[f"write_{w}_cpu_seconds"] = r["seconds"], r["cpu_seconds"]
    row["pairs"] = r["pairs"]
    path.unlink()
    return row


def _cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the spawned writers):
    the work done, whatever share of the cores the other jobs on the machine left."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _drain(batches, limit: int) -> tuple[int, float]:
    n, t = 0, time.perf_counter()
    for b in batches:
        n += len(b["__key__"]) if isinstance(b, dict) else len(b.keys)  # webdataset: a dict
        if n >= limit:
            break
    return n, time.perf_counter() - t


def bench_loader(path: str, workers: int, tokenize: bool, limit: int) -> dict:
    from clicktower.data.loader import ClickPairLoader, DataConfig, PairTokenizer

    tokens = PairTokenizer(minilm_tokenizer(), 32, 64) if tokenize else None   # query, item token limits
    loader = ClickPairLoader(DataConfig(num_workers=workers, shuffle_buffer=1000), path, BATCH,
                             seed=0, tokens=tokens)
    n, dt = _drain(loader, limit)
    return {"reader": "clicktower", "workers": workers, "tokenize": tokenize, "pairs": n,
            "seconds": round(dt, 2), "pairs_per_s": round(n / dt)}


def bench_wds(path: str, workers: int, tokenize: bool, limit: int) -> dict:
    import torch
    import webdataset as wds

    from clicktower.data.shards import load_manifest

    urls = [s["path"] for s in load_manifest(path)["shards"]]
    tok = minilm_tokenizer() if tokenize else None

    def collate(samples):
        js = [s["json"] for s in samples]
        batch = {"__key__": [s["__key__"] for s in samples], "queries": [j["query"] for j in js],
                 "items": [j["item_text"] for j in js]}
        if tok is not None:
            for side, texts, limit_ in (("query", batch["queries"], 32), ("item", batch["items"], 64)):
                enc = tok(texts, padding=True, truncation=True, max_length=limit_,
                          pad_to_multiple_of=8, return_tensors="pt")
                batch[f"{side}_input_ids"] = enc["input_ids"]
        return batch

    ds = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node,
                         workersplitter=wds.split_by_worker, seed=0)
          .shuffle(1000).decode().batched(BATCH, collation_fn=collate, partial=False))
    loader = ds if workers == 0 else torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    n, dt = _drain(loader, limit)
    return {"reader": "webdataset", "workers": workers, "tokenize": tokenize, "pairs": n,
            "seconds": round(dt, 2), "pairs_per_s": round(n / dt)}


def memory_probe(path: str, trace: bool = False) -> None:
    """Run in a fresh subprocess: RSS after imports, peak RSS after loading the manifest,
    building the loader and reading 20 batches. With ``trace``: the Python heap (tracemalloc)
    the manifest and the loader still hold after those 20 batches, and its peak."""
    import psutil

    from clicktower.data.loader import ClickPairLoader, DataConfig
    from clicktower.data.shards import load_manifest

    cfg = DataConfig(num_workers=0, shuffle_buffer=1000, infinite=True)

    if trace:
        import tracemalloc

        tracemalloc.start()
        manifest = load_manifest(path)
        loader = ClickPairLoader(cfg, manifest, BATCH, seed=0)
        it = iter(loader)
        for _ in range(20):
            batch = next(it)
        del batch
        kept, peak = tracemalloc.get_traced_memory()
        print(json.dumps({"heap_kept": kept, "heap_peak": peak}))
        return
    base = psutil.Process().memory_info().rss
    t = time.perf_counter()
    manifest = load_manifest(path)
    loader = ClickPairLoader(cfg, manifest, BATCH, seed=0)
    start = time.perf_counter() - t
    it = iter(loader)
    for _ in range(20):
        next(it)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a probe started
    # by a big parent would report the parent's peak.
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    print(json.dumps({"shards": len(manifest["shards"]), "rss_after_imports": base, "peak_rss": peak,
                      "loader_start_s": round(start, 2),
                      "manifest_json_bytes": os.path.getsize(manifest["path"])}))


def bench_memory(src: str, work: Path, pairs: int) -> list[dict]:
    from clicktower.data.shards import write_shards
    from clicktower.data.sources import FieldMap

    rows = []
    head = work / "mem_pairs.jsonl"   # the first `pairs` pairs of the input
    with open(src, encoding="utf-8") as fin, open(head, "w", encoding="utf-8") as fout:
        for _, line in zip(range(pairs), fin):
            fout.write(line)
    for shards in (10, 10_000):
        out = work / f"mem{shards}"
        t = time.perf_counter()
        write_shards([str(head)], str(out), FieldMap(), shard_size=max(1, pairs // shards))
        wrote = time.perf_counter() - t
        row = {}
        for extra in ([], ["--trace"]):
            proc = subprocess.run([sys.executable, __file__, "--memory-probe", str(out), *extra],
                                  capture_output=True, text=True, check=True,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        row["write_s"] = round(wrote, 1)
        rows.append(row)
        shutil.rmtree(out)
    return rows


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import psutil

    return (f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def write_md(res: dict, path: Path) -> None:
    L = ["# bench_data: clicktower data engine vs plain webdataset", "",
         f"Command: `{res['command']}`" + (f" (memory rows: `{res['memory_command']}`)"
                                           if res.get("memory_command") else ""), "", f"Machine: {res['machine']}; {res['date']}.", "",
         "The machine was shared with other engineers' tests and benchmarks during the run "
         f"(1-minute load average {res.get('load', '?')} at the start, on 2 cores): runs with more "
         "processes than free cores measure oversubscription, not scaling. Throughputs are single "
         "runs, noisy to perhaps +-20%; process start-up (spawned writers, loader workers: "
         "~0.5 s each) is inside each timing. Writers share the ranges of the input "
         f"(uncompressed JSONL cut every {res.get('split_bytes', 0) / 2**20:g} MiB at line "
         "boundaries); each reads only its own ranges.", "",
         f"Data: {res['pairs']} synthetic pairs (`clicktower.data.synth.generate`), "
         f"shards of {res['shard_size']} pairs, {res['bytes_per_pair']} bytes/pair in plain tar.", "",
         "## Shard writing", "",
         "Best of the rounds (all rounds' seconds listed); load = 1-minute load average before "
         "the best round.", "",
         "CPU s: user + system time of the parent and the writer processes in that round (the "
         "work done, whatever share of the cores the machine's other jobs left).", "",
         "| writers | gzip | pairs | seconds | pairs/s | all rounds (s) | CPU s | ranges | shards | bytes/pair | load |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["write"]:
        L.append(f"| {r['workers']} | {r['gzip']} | {r['pairs']} | {r['seconds']} | {r['pairs_per_s']:,} | "
                 f"{', '.join(map(str, r.get('all_seconds', [])))} | {r.get('cpu_seconds', '?')} | {r.get('ranges', '?')} | {r['shards']} | {r['bytes_per_pair']} | {r.get('load_before', '?')} |")
    if res.get("csv"):
        c = res["csv"]
        w = [k.split("_")[1] for k in c if k.startswith("write_") and k.endswith("_cpu_seconds")]
        L += ["", "## Splitting a CSV" + (f" (`{res['csv_command']}`)" if res.get("csv_command") else ""), "",
              f"The same pairs as a {c['csv_bytes'] / 2**20:.1f} MiB CSV: the serial csv parse in the parent "
              f"that finds record boundaries for {c['ranges']} ranges, against writing the shards "
              f"(parse included). Single runs, load {c.get('load', '?')}.", "",
              "| split parse (s) | " + " | ".join(f"write, {n} writer(s): s (CPU s)" for n in w) + " |",
              "|---|" + "---|" * len(w),
              f"| {c['split_seconds']} | " + " | ".join(
                  f"{c[f'write_{n}_seconds']} ({c[f'write_{n}_cpu_seconds']})" for n in w) + " |"]
    L += ["", f"## Reading (one rank, batch {BATCH}, shuffle buffer 1000)", "",
          "workers 0 = one reader in the training process; otherwise DataLoader worker processes. "
          "Tokenise: MiniLM fast tokenizer, queries <= 32 and items <= 64 tokens, padded to the "
          "batch's longest (multiple of 8).", "",
          "| reader | workers | tokenise | pairs | seconds | pairs/s |", "|---|---|---|---|---|---|"]
    for r in res["read"]:
        L.append(f"| {r['reader']} | {r['workers']} | {r['tokenize']} | {r['pairs']} | {r['seconds']} | "
                 f"{r['pairs_per_s']:,} |")
    L += ["", "## Reader memory vs shard count (same samples)", "",
          "Fresh subprocess: load the manifest, build the loader, read 20 batches. Peak RSS includes "
          "torch and Python (RSS after imports shown). Heap kept / heap peak: what tracemalloc "
          "counts in a second fresh subprocess doing the same (Python objects and numpy arrays "
          "of the manifest and loader; not mmapped index pages).", "",
          "| shards | manifest.json | RSS after imports | peak RSS | peak - imports | heap kept | heap peak | loader start (s) |",
          "|---|---|---|---|---|---|---|---|"]
    for r in res["memory"]:
        L.append(f"| {r['shards']:,} | {r['manifest_json_bytes'] / 2**20:.1f} MiB | "
                 f"{r['rss_after_imports'] / 2**20:.0f} MiB | {r['peak_rss'] / 2**20:.0f} MiB | "
                 f"{(r['peak_rss'] - r['rss_after_imports']) / 2**20:.0f} MiB | "
                 f"{r['heap_kept'] / 2**20:.2f} MiB | {r['heap_peak'] / 2**20:.2f} MiB | {r['loader_start_s']} |")
    if res.get("remote"):
        L += write_remote_md(res["remote"])
    path.write_text("\n".join(L) + "\n")


def write_remote_md(r: dict) -> list[str]:
    """The object-storage rows (``--remote-only``) as markdown lines."""
    L = ["", "## Shards on object storage and HTTP" + f" (`{r['command']}`)", "",
         f"{r['machine']}; {r['date']}; 1-minute load average {r['load']} at the start. "
         f"{r['pairs']} synthetic pairs in shards of {r['shard_size']}, the same shards on local "
         "disk, in moto's S3 server and behind Python's http.server (both on 127.0.0.1, in the "
         "benchmark's process, so they share its cores). One reader (`num_workers=0`), batches of "
         f"{BATCH}, the default `data.block_size` (1024), `io_threads` and `prefetch_blocks`; "
         f"decode-only rows read a whole epoch, tokenised rows the first {r['tokenize_limit']:,} pairs; "
         "a fresh subprocess per row (peak RSS includes torch). Requests count the ranged reads of "
         "sample runs and index chunks; bytes fetched include the index.", "",
         "| store | tokenise | pairs | pairs/s | requests / 1,000 samples | bytes fetched / used | peak RSS |",
         "|---|---|---|---|---|---|---|"]
    for x in r["stores"]:
        L.append(f"| {x['store']} | {x['tokenize']} | {x['pairs']} | {x['pairs_per_s']:,} | "
                 f"{x['requests_per_1000'] or '-'} | {x['fetched_per_used'] or '-'} | {x['peak_rss_mib']} MiB |")
    L += ["", "Simulated ranks (every rank of the world size in turn, a whole epoch each, from S3):", "",
          "| world size | samples read | requests / 1,000 samples | bytes fetched / used |", "|---|---|---|---|"]
    for x in r["ranks"]:
        L.append(f"| {x['world_size']} | {x['samples']} | {x['requests_per_1000']} | {x['fetched_per_used']} |")
    L += ["", "Distinct shards per global batch (mean, min), from the orders alone; before: the "
          "previous order (shard permutation, 64-sample blocks shuffled inside shards, 1000-position "
          "windows), after: the defaults (`interleave_shards` 16). Query repeats: samples per "
          "global batch whose query another sample of the batch has (synthetic Zipf clicks).", "",
          "| shards x size | ranks x batch | global batches | target | before (min) | after (min) | query repeats before | after |",
          "|---|---|---|---|---|---|---|---|"]
    for x in r["mixing"]:
        L.append(f"| {x['shards']} x {x['shard_size']:,} | {x['world_size']} x {x['batch_per_rank']} | "
                 f"{x['global_batches']} | {x['target']:g} | {x.get('distinct_before', '-')} "
                 f"({x.get('min_before', '-')}) | {x['distinct_after']} ({x['min_after']}) | "
                 f"{x.get('query_repeats_before', '-')} | {x.get('query_repeats_after', '-')} |")
    s = r["startup"]
    L += ["", f"Start-up on a {s['shards']:,}-shard manifest at {s['ranks']} ranks: before, every "
          f"rank statted every shard and index (4 calls a shard: {s['before_calls']:,} in all); after, "
          f"{s['after_calls']} HTTP requests at the S3 server in all (rank 0: "
          f"{s['per_rank'][0]['http_requests']}, the manifest and the folder listing, 1,000 keys a "
          f"page; rank 1: {s['per_rank'][1]['http_requests']}, the manifest; "
          f"{s['per_rank'][0]['seconds']} s and {s['per_rank'][1]['seconds']} s)."]
    return L


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--read-limit", type=int, default=30_000, help="pairs read per reader case")
    parser.add_argument("--mem-pairs", type=int, default=20_000)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--split-bytes", type=int, default=2**20,
                        help="writer range size (this ~15 MB input; the CLI default is 64 MiB)")
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write-rounds", type=int, default=3)
    parser.add_argument("--csv-only", action="store_true",
                        help="redo only the CSV split row of an existing results/bench_data.json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true",
                        help="redo only the memory rows of an existing results/bench_data.json")
    parser.add_argument("--remote-only", action="store_true",
                        help="redo only the object-storage rows (bench_data_remote.py) of an "
                             "existing results/bench_data.json")
    args = parser.parse_args()
    if args.remote_only:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        res = json.loads((RESULTS / "bench_data.json").read_text())
        load = round(os.getloadavg()[0], 1)
        sizes = (60_000, 5_000, args.read_limit, 10_000) if not args.quick else (6_000, 500, 3_000, 1_000)
        # bench_data_remote.py runs as its own script (benchmark scripts do not import each
        # other) and hands its rows back as JSON.
        with tempfile.TemporaryDirectory() as tmp:
            rows = Path(tmp) / "remote.json"
            subprocess.run([sys.executable, str(Path(__file__).with_name("bench_data_remote.py")),
                            "--pairs", str(sizes[0]), "--shard-size", str(sizes[1]), "--read-limit", str(sizes[2]),
                            "--tokenize-limit", str(sizes[3]), "--json", str(rows)], check=True)
            res["remote"] = json.loads(rows.read_text())
        res["remote"].update(command="python benchmarks/bench_data.py --remote-only", load=load,
                             machine=machine(),
                             date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        name = "bench_data_quick" if args.quick else "bench_data"
        if not args.quick:
            (RESULTS / "bench_data.json").write_text(json.dumps(res, indent=2) + "\n")
        write_md(res, RESULTS / f"{name}.md")
        print((RESULTS / f"{name}.md").read_text())
        return
    if args.memory_probe:
        memory_probe(args.memory_probe, args.trace)
        return
    if args.csv_only:
        from clicktower.data.synth import generate

        work = Path(tempfile.mkdtemp(prefix="bench_data_"))
        try:
            generate(work / "synth", args.pairs, seed=0)
            res = json.loads((RESULTS / "bench_data.json").read_text())
            res["csv"] = bench_csv(str(work / "synth" / "train.jsonl"), work, args.writers,
                                   args.shard_size, args.split_bytes)
            res["csv"]["load"] = round(os.getloadavg()[0], 1)
            res["csv_command"] = "python benchmarks/bench_data.py --csv-only"
            (RESULTS / "bench_data.json").write_text(json.dumps(res, indent=2) + "\n")
            write_md(res, RESULTS / "bench_data.md")
            print((RESULTS / "bench_data.md").read_text())
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    if args.memory_only:
        from clicktower.data.synth import generate

        work = Path(tempfile.mkdtemp(prefix="bench_data_"))
        try:
            generate(work / "synth", args.mem_pairs, seed=0)
            res = json.loads((RESULTS / "bench_data.json").read_text())
            res["memory"] = bench_memory(str(work / "synth" / "train.jsonl"), work, args.mem_pairs)
            res["memory_command"] = "python benchmarks/bench_data.py --memory-only"
            (RESULTS / "bench_data.json").write_text(json.dumps(res, indent=2) + "\n")
            write_md(res, RESULTS / "bench_data.md")
            print((RESULTS / "bench_data.md").read_text())
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    if args.quick:
        args.pairs, args.shard_size, args.read_limit, args.mem_pairs = 6000, 1000, 3000, 2000
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from clicktower.data.synth import generate

    load = round(os.getloadavg()[0], 1)
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        t = time.perf_counter()
        generate(work / "synth", args.pairs, seed=0)
        print(f"[bench_data] generated {args.pairs} pairs in {time.perf_counter() - t:.1f}s", flush=True)
        src = str(work / "synth" / "train.jsonl")
        writes = []
        for gz in (False, True):
            # 1 and N writers alternate, 3 rounds; the best round of each is kept (the other
            # engineers' jobs on this machine come and go) and every time is listed.
            runs: dict[int, list[dict]] = {1: [], args.writers: []}
            for _ in range(args.write_rounds):
                for w in runs:
                    if runs[w]:
                        shutil.rmtree(runs[w][-1]["dir"])
                    runs[w].append(bench_write(src, work, w, gz, args.shard_size, args.split_bytes))
                    print("[bench_data] write", runs[w][-1], flush=True)
            for w, rs in runs.items():
                best = min(rs, key=lambda r: r["seconds"])
                writes.append({**best, "dir": rs[-1]["dir"], "all_seconds": [r["seconds"] for r in rs]})
        csv_row = bench_csv(src, work, args.writers, args.shard_size, args.split_bytes)
        csv_row["load"] = round(os.getloadavg()[0], 1)
        print("[bench_data] csv", csv_row, flush=True)
        plain = writes[0]["dir"]
        reads = []
        for tokenize in (False, True):
            for workers in (0, 1, 2, 4):
                reads.append(bench_loader(plain, workers, tokenize, args.read_limit))
                print("[bench_data] read", reads[-1], flush=True)
            for workers in (0, 2):
                reads.append(bench_wds(plain, workers, tokenize, args.read_limit))
                print("[bench_data] read", reads[-1], flush=True)
        reads.append({**bench_loader(writes[2]["dir"], 0, False, args.read_limit), "reader": "clicktower (.tar.gz)"})
        print("[bench_data] read", reads[-1], flush=True)
        memory = bench_memory(src, work, args.mem_pairs)
        print("[bench_data] memory", memory, flush=True)
        res = {"command": "python benchmarks/bench_data.py" + (" --quick" if args.quick else ""),
               "machine": machine(), "shared_machine": True,
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "pairs": args.pairs, "shard_size": args.shard_size, "batch_size": BATCH,
               "split_bytes": args.split_bytes, "load": load,
               "bytes_per_pair": writes[0]["bytes_per_pair"],
               "write": [{k: v for k, v in r.items() if k != "dir"} for r in writes],
               "read": reads, "memory": memory, "csv": csv_row}
        name = "bench_data_quick" if args.quick else "bench_data"
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
        write_md(res, RESULTS / f"{name}.md")
        print((RESULTS / f"{name}.md").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
