"""Which temperature settings work for clicktower on Home Depot: a sweep on the TUNING split.

    python benchmarks/homedepot_temperature.py --out /tmp/hd_temp          # ~20 min
    python benchmarks/homedepot_temperature.py --out /tmp/hd_temp_smoke --quick --results-dir /tmp/hd_temp_smoke

It reuses ``benchmarks/homedepot.py``'s split, pairs (with their exclusion lists), shards and
clicktower recipe, and changes only the temperature keys: ``model.init_temperature``,
``model.learn_temperature`` and ``optim.logit_scale_lr``. Every variant trains one epoch over
the same pairs with the same seed, and is scored on the 500 tuning queries (their judged
items plus the distractors: the in-training evaluation of ``homedepot.py``) at the last step.
The reported split of ``homedepot.py`` is never touched, so its numbers stay unbiased by
this choice.

Writes ``OUT/results.json`` and ``benchmarks/results/homedepot_temperature.{json,md}`` (not for
``--quick`` unless ``--results-dir`` is given).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# (name, overrides): the recipe's own setting first.
VARIANTS = [
    ("learned, init 0.05, scale lr 1e-3 (recipe)", []),
    ("fixed 0.05 (scale 20, as MNRL)", ["model.learn_temperature=false"]),
    ("learned, init 0.02", ["model.init_temperature=0.02"]),
    ("learned, init 0.05, scale lr 1e-2", ["optim.logit_scale_lr=1.0e-2"]),
    ("fixed 0.1 (scale 10)", ["model.learn_temperature=false", "model.init_temperature=0.1"]),
]


def _bench():
    """``benchmarks/homedepot.py`` as a module (benchmarks/ is a folder of scripts)."""
    spec = importlib.util.spec_from_file_location("homedepot_bench", REPO / "benchmarks" / "homedepot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def last_tuning_eval(run: Path) -> dict:
    """The last in-training evaluation of a run (its ``metrics.jsonl`` eval records)."""
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if any(k.startswith("eval/") for k in e)]
    return {k.split("/", 1)[1]: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}


def markdown(report: dict) -> str:
    """The sweep as a Markdown page."""
    lines = ["# Home Depot: temperature settings on the tuning split (benchmarks/homedepot_temperature.py)", "",
             f"{report['pairs']:,} training pairs, one epoch, seed 0, batch {report['batch_size']}; scored on "
             f"{report['tuning_queries']} tuning queries over {report['tuning_catalog']:,} items at the last step. "
             f"Machine: {report['machine']}; 1-min load {report['load_before']} before, {report['load_after']} "
             f"after; {report['wall_min']:.1f} min.", "",
             "| setting | Recall@10 | nDCG@10 | MRR@10 | final logit scale | pairs/s |", "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        m = row["tuning"]
        lines.append(f"| {row['name']} | {m.get('recall@10', float('nan')):.4f} | {m.get('ndcg@10', float('nan')):.4f} | "
                     f"{m.get('mrr@10', float('nan')):.4f} | {row['final_logit_scale']:.1f} | {row['pairs_per_sec']} |")
    best = max(report["rows"], key=lambda r: r["tuning"].get("ndcg@10", -1.0))
    lines += ["", f"Best by nDCG@10: **{best['name']}**. Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    hd = _bench()
    args = hd.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()[0]
    d = hd.load_data(args)
    tuning = hd.write_tuning_files(d, out / "tuning")
    shards = hd.write_training_shards(d["pairs"], out / "data")
    steps = len(d["pairs"]) // args.batch_size
    rows = []
    for index, (name, extra) in enumerate(VARIANTS):
        args.set = list(extra)
        run = out / f"run_{index}"
        _, figures = hd.train_clicktower(args, shards, run, 0, steps, True, tuning)
        rows.append({"name": name, "overrides": extra, "tuning": last_tuning_eval(run),
                     "final_logit_scale": figures.get("final_logit_scale") or float("nan"),
                     "pairs_per_sec": figures.get("pairs_per_sec")})
        hd.log(f"{name}: {json.dumps(rows[-1])}")
    report = {"pairs": len(d["pairs"]), "batch_size": args.batch_size, "tuning_queries": len(d["tuning"]),
              "tuning_catalog": len(d["tuning_catalog"]), "machine": hd.machine(), "rows": rows,
              "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
              "wall_min": (time.time() - started) / 60,
              "command": "python benchmarks/homedepot_temperature.py " + " ".join(argv or sys.argv[1:])}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    results_dir = Path(args.results_dir) if args.results_dir else (None if args.quick else REPO / "benchmarks/results")
    if results_dir is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / "homedepot_temperature.json").write_text(json.dumps(report, indent=2) + "\n")
        (results_dir / "homedepot_temperature.md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
