"""The demo: synthesise click logs, shard them, evaluate the pretrained MiniLM zero-shot,
fine-tune it, evaluate again, print a before/after table, with the cold-start queries (whose
relevant products no training pair clicks) and the warm ones apart.

    clicktower demo --out demo_out

The last stdout line is ``{"before": {...}, "after": {...}}``; the last line on stderr, after
it, names the fine-tuned model's folder.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from clicktower.launcher.errors import run_cli

METRICS = ("recall@10", "recall@100", "mrr@10", "ndcg@10")
# Products of the demo's 2,000 that no training pair clicks: the cold-start rows of its table.
DEMO_COLD_ITEMS = 200


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clicktower demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="work folder (data, shards, run)")
    parser.add_argument("--config", default="configs/demo.yaml", help="training config")
    parser.add_argument("--pairs", type=int, default=20000, help="synthetic click pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cold-items", type=int, default=DEMO_COLD_ITEMS,
                        help="products kept out of every training pair (cold start), still in the catalog")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    args = parser.parse_args(argv)
    # Imported after parsing: --help and usage errors need neither torch nor transformers.
    from clicktower.data.shards import write_shards
    from clicktower.data.sources import FieldMap
    from clicktower.data.synth import generate
    from clicktower.launcher.engine.config import load_config
    from clicktower.launcher.engine.training import train
    from clicktower.launcher.retrieval.evaluation import evaluate

    out = Path(args.out)
    started = time.perf_counter()

    cfg = load_config(args.config, [f"data.train_manifest={out / 'shards'}",
                                    f"train.output_dir={out / 'run'}", *args.overrides])
    counts = generate(out / "synth", args.pairs, args.seed, cold_items=args.cold_items)
    print(f"[demo] synthetic click log: {json.dumps(counts)}", flush=True)
    manifest = write_shards([str(out / "synth" / "train.jsonl")], str(out / "shards"), FieldMap(),
                            shard_size=5000, overwrite=True)
    print(f"[demo] {manifest['num_samples']} pairs in {len(manifest['shards'])} shards", flush=True)
    queries, catalog = str(out / "synth" / "eval.jsonl"), str(out / "synth" / "catalog.jsonl")

    shards = str(out / "shards")
    before = evaluate(cfg.model.name_or_path, queries, catalog, train_manifest=shards)
    print(f"[demo] zero-shot: {json.dumps(before)}", flush=True)
    final = train(cfg)
    after = evaluate(str(final), queries, catalog, train_manifest=shards)
    print(f"[demo] fine-tuned: {json.dumps(after)}", flush=True)

    print(f"\n{'metric':<18}{'before':>10}{'after':>10}{'delta':>10}")
    for key in [*METRICS, "cold/recall@10", "warm/recall@10"]:
        if key in before and key in after:
            print(f"{key:<18}{before[key]:>10.4f}{after[key]:>10.4f}{after[key] - before[key]:>+10.4f}")
    print(f"({before['num_queries']} held-out queries, {before.get('cold/num_queries', 0)} of them cold: "
          f"every relevant product is one no training pair clicked; "
          f"{time.perf_counter() - started:.0f} s in all)\n")
    print(json.dumps({"before": before, "after": after}), flush=True)
    print(f"[demo] the fine-tuned model: {final}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
