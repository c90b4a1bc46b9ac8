"""bench_data rows for shards off the local disk (``python benchmarks/bench_data_remote.py``, or
``python benchmarks/bench_data.py --remote-only``, which also renders them into results/bench_data.md).

* Reading one shard set from local disk, from moto's S3 server and from Python's http.server
  (both on 127.0.0.1, tests/support/store_servers.py): decode-only and tokenised pairs/s of
  one reader (``num_workers=0``), requests per 1,000 samples, bytes fetched per byte used,
  peak RSS (a fresh subprocess per case).
* Bytes fetched per byte used and requests per 1,000 samples at 1, 2 and 4 simulated ranks
  (every rank of a world size read in turn, a whole epoch each, from S3).
* Distinct shards and same-query collisions per global batch, before (the previous order:
  shard permutation, 64-sample block shuffle inside shards, 1000-position windows) and after
  (blocks of 16 shards interleaved, rank windows), computed from the orders alone.
* Start-up: store calls to check a 10,000-shard manifest at 2 ranks, before (every rank
  stats every shard and index: 4 calls a shard) and after (rank 0 lists the folder and
  broadcasts; counted at the S3 server).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))
BATCH = 512


def _loader(url: str, world: int = 1, rank: int = 0, tokens=None, **cfg):
    from clicktower.data.loader import ClickPairLoader, DataConfig, Rank

    return ClickPairLoader(DataConfig(num_workers=0, **cfg), url, BATCH, Rank(rank, world), seed=0,
                           tokens=tokens)


def read_probe(url: str, limit: int, tokenize: bool) -> None:
    """In a fresh subprocess: read ``limit`` pairs (0: an epoch) from ``url``; print pairs/s,
    I/O (requests and bytes fetched / used only for a whole epoch: a cut-off read has
    prefetched more than it used) and peak RSS."""
    import psutil

    tokens = None
    if tokenize:
        from common import minilm_tokenizer

        from clicktower.data.loader import PairTokenizer

        tokens = PairTokenizer(minilm_tokenizer(), 32, 64)
    base = psutil.Process().memory_info().rss
    loader = _loader(url, tokens=tokens)
    n, t = 0, time.perf_counter()
    for batch in loader:   # limit 0: the whole epoch (then bytes fetched / used is exact)
        n += len(batch.keys)
        if limit and n >= limit:
            break
    dt = time.perf_counter() - t
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    io = loader.io_counts()
    print(json.dumps({"pairs": n, "seconds": round(dt, 2), "pairs_per_s": round(n / dt),
                      "requests_per_1000": round(1000 * io["io_requests"] / n, 2) if not limit else None,
                      "fetched_per_used": round(io["io_bytes_read"] / max(1, io["io_bytes_used"]), 3)
                      if not limit else None,
                      "peak_rss_mib": round(peak / 2**20), "rss_before_mib": round(base / 2**20),
                      "retries": loader.error_counts()["retries"]}))


def bench_stores(stores: dict[str, str], limit: int, tok_limit: int, env: dict) -> list[dict]:
    rows = []
    for tokenize, n in ((False, 0), (True, tok_limit)):
        for store, url in stores.items():
            proc = subprocess.run([sys.executable, __file__, "--read-probe", url, str(n),
                                   "1" if tokenize else "0"], capture_output=True, text=True,
                                  env={**os.environ, **env}, check=True)
            row = {"store": store, "tokenize": tokenize, **json.loads(proc.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print("[bench_data] remote", row, flush=True)
    return rows


def bench_ranks(url: str, worlds=(1, 2, 4)) -> list[dict]:
    """A whole epoch on every simulated rank of each world size, from ``url``."""
    rows = []
    for world in worlds:
        fetched = used = requests = samples = 0
        for rank in range(world):
            loader = _loader(url, world, rank)
            samples += sum(len(b.keys) for b in loader)
            io = loader.io_counts()
            fetched, used = fetched + io["io_bytes_read"], used + io["io_bytes_used"]
            requests += io["io_requests"]
        rows.append({"world_size": world, "samples": samples, "requests_per_1000": round(1000 * requests / samples, 2),
                     "fetched_per_used": round(fetched / used, 3)})
        print("[bench_data] ranks", rows[-1], flush=True)
    return rows


def _old_order(counts, seed=0, epoch=0, window=1000, block=64) -> np.ndarray:
    """The previous epoch order (before issue 16), as (shard, sample) per position: a
    seeded shard permutation, a permutation of 64-sample blocks inside each shard, then a
    permutation inside each window of 1000 positions (same seeding scheme as it had)."""
    from clicktower.data.order import rng

    perm = rng(seed, epoch, 0).permutation(len(counts))
    shards, samples = [], []
    for shard in perm:
        n = int(counts[shard])
        order = rng(seed, epoch, 2, shard).permutation(-(-n // block))
        idx = (order[:, None] * block + np.arange(block)[None, :]).ravel()
        idx = idx[idx < n]   # the last block is short
        shards.append(np.full(len(idx), shard))
        samples.append(idx)
    seq = np.stack([np.concatenate(shards), np.concatenate(samples)], axis=1)
    out = seq.copy()
    for w in range(-(-len(seq) // window)):
        part = seq[w * window:(w + 1) * window]
        out[w * window:(w + 1) * window] = part[rng(seed, epoch, 1, w).permutation(len(part))]
    return out


def mixing(counts: list[int], world: int, batch: int, queries: dict | None = None,
           batches: int | None = None) -> dict:
    """Distinct shards (and repeated queries) per global batch, before and after."""
    from clicktower.data.loader import DataConfig
    from clicktower.data.stream import Plan, Source

    g = world * batch
    n = sum(counts)
    total = n // g if batches is None else min(batches, n // g)
    old = _old_order(np.asarray(counts))
    cfg = DataConfig()
    plan = Plan([Source.from_counts(counts)], None, 0, cfg.block_size, cfg.interleave_shards,
                cfg.shuffle_buffer, False)
    seg, _ = plan.segment(0, [], world, batch)
    before, after, rep_before, rep_after = [], [], [], []
    for k in range(total):
        pairs = []
        for r in range(world):
            slots = np.arange(k * batch, (k + 1) * batch)
            w = k * batch // seg.window
            got = seg.locate(r, seg.positions(r, w)[slots - w * seg.window])[1]
            pairs += list(zip(got.shards.tolist(), got.samples.tolist()))
        after.append(len({s for s, _ in pairs}))
        if old is not None:
            prev = [tuple(x) for x in old[k * g:(k + 1) * g].tolist()]
            before.append(len({s for s, _ in prev}))
        if queries is not None:
            rep_after.append(len(pairs) - len({queries[p] for p in pairs}))
            rep_before.append(g - len({queries[p] for p in prev}))
    row = {"shards": len(counts), "shard_size": counts[0], "world_size": world, "batch_per_rank": batch,
           "global_batches": total, "target": min(len(counts), cfg.interleave_shards) / 2,
           "distinct_after": round(float(np.mean(after)), 2), "min_after": int(min(after))}
    if before:
        row.update(distinct_before=round(float(np.mean(before)), 2), min_before=int(min(before)))
    if queries is not None:
        row.update(query_repeats_before=round(float(np.mean(rep_before)), 2),
                   query_repeats_after=round(float(np.mean(rep_after)), 2))
    print("[bench_data] mixing", row, flush=True)
    return row


def startup(work: Path, endpoint: str, faults, shards: int = 10_000) -> dict:
    """Store calls to start a 2-rank loader on a ``shards``-shard manifest (S3)."""
    from clicktower.data.loader import ClickPairLoader, DataConfig, Rank
    from clicktower.data.shards import write_shards
    from clicktower.data.sources import FieldMap
    from clicktower.data.storage import Storage

    src = work / "startup.jsonl"
    with open(src, "w") as fh:
        for i in range(shards):
            fh.write(json.dumps({"query": f"q{i}", "item_id": i, "item_text": f"item {i}"}) + "\n")
    local = work / "startup"
    write_shards([str(src)], str(local), FieldMap(), shard_size=1)
    fs = Storage().filesystem("s3://")
    files = sorted(p.name for p in local.iterdir())
    fs.put([str(local / f) for f in files], [f"clicks/startup/{f}" for f in files])
    url = "s3://clicks/startup/manifest.json"
    box = {}

    def rank0(obj):
        box["found"] = obj
        return obj

    calls = []
    for rank, broadcast in ((0, rank0), (1, lambda obj: box["found"])):
        mark = len(faults.log)
        t = time.perf_counter()
        ClickPairLoader(DataConfig(), url, 1, Rank(rank, 2), broadcast_object=broadcast)
        calls.append({"rank": rank, "http_requests": len(faults.log) - mark,
                      "seconds": round(time.perf_counter() - t, 2)})
    row = {"shards": shards, "ranks": 2, "before_calls": 4 * shards * 2,
           "after_calls": sum(c["http_requests"] for c in calls), "per_rank": calls}
    print("[bench_data] startup", row, flush=True)
    return row


def queries_of(manifest_dir: str) -> dict:
    """``(shard, sample) -> query`` of a local shard set (for query collisions)."""
    from clicktower.data.shards import iter_shard, load_manifest

    out = {}
    for s, shard in enumerate(load_manifest(manifest_dir)["shards"]):
        for i, sample in enumerate(iter_shard(shard["path"])):
            out[(s, i)] = sample["query"]
    return out


def run(pairs: int, shard_size: int, limit: int, tok_limit: int) -> dict:
    """Every row above on ``pairs`` synthetic pairs in shards of ``shard_size``."""
    import shutil
    import tempfile

    from store_servers import S3_ENV, http_server, make_bucket, moto_s3

    from clicktower.data.shards import write_shards
    from clicktower.data.sources import FieldMap
    from clicktower.data.synth import generate

    work = Path(tempfile.mkdtemp(prefix="bench_data_remote_"))
    try:
        generate(work / "synth", pairs, seed=0)
        local = work / "shards"
        write_shards([str(work / "synth" / "train.jsonl")], str(local), FieldMap(),
                     shard_size=shard_size)
        with moto_s3() as (endpoint, faults), http_server(str(local)) as (http_url, _):
            env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
            os.environ.update(env)
            make_bucket(endpoint, "clicks")
            write_shards([str(work / "synth" / "train.jsonl")], "s3://clicks/bench", FieldMap(),
                         shard_size=shard_size)
            stores = {"local disk": str(local), "moto S3": "s3://clicks/bench",
                      "http.server": f"{http_url}/manifest.json"}
            res = {"stores": bench_stores(stores, limit, tok_limit, env),
                   "ranks": bench_ranks("s3://clicks/bench")}
            queries = queries_of(str(local))
            counts = [sum(1 for s, _ in queries if s == k) for k in range(len(set(s for s, _ in queries)))]
            res["mixing"] = [mixing([500] * 20, 2, 128),
                             mixing(counts, 2, 128, queries=queries),
                             mixing([100_000] * 100, 8, 8192, batches=20)]
            res["startup"] = startup(work, endpoint, faults)
        res.update(pairs=pairs, shard_size=shard_size, read_limit=limit, tokenize_limit=tok_limit)
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """Run every row and print them (or write them to ``--json``) as JSON; ``bench_data.py
    --remote-only`` calls this and renders the rows into ``results/bench_data.md``."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=60_000, help="synthetic pairs")
    parser.add_argument("--shard-size", type=int, default=5_000, help="samples per shard")
    parser.add_argument("--read-limit", type=int, default=30_000, help="pairs read per decode-only case")
    parser.add_argument("--tokenize-limit", type=int, default=10_000, help="pairs read per tokenised case")
    parser.add_argument("--json", default=None, help="write the rows to this file instead of stdout")
    args = parser.parse_args(argv)
    rows = json.dumps(run(args.pairs, args.shard_size, args.read_limit, args.tokenize_limit), indent=2)
    if args.json:
        Path(args.json).write_text(rows + "\n")
    else:
        print(rows)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--read-probe"]:  # the fresh subprocess of one read (read_probe)
        read_probe(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
    else:
        main()
