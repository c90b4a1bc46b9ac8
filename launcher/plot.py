"""clicktower plot OUTPUT_DIR: loss, temperature, throughput and retrieval metrics against step.

Reads ``OUTPUT_DIR/metrics.jsonl`` and writes ``OUTPUT_DIR/metrics.png`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clicktower.data.errors import DataError
from clicktower.launcher.errors import run_cli

PANELS = (("loss", "training loss"), ("temperature", "temperature"), ("pairs_per_sec", "pairs / s"))
RETRIEVAL_PREFIXES = ("eval/", "recall@", "mrr@", "ndcg@")


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (one JSON object per line)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (is this a training output folder?)")
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise DataError(f"{path}: line {line_no}: invalid JSON") from None
    if not records:
        raise DataError(f"{path}: empty file, nothing to plot")
    return records


def plot_metrics(records: list[dict], out: Path, title: str = "") -> Path:
    """Draw one panel per quantity against step and save a PNG.

    Args:
        records: metrics records with a ``step`` key.
        out: the PNG path.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    retrieval = sorted({k for r in records for k in r
                        if k.startswith(RETRIEVAL_PREFIXES) and isinstance(r[k], (int, float))})
    panels = [p for p in PANELS if any(p[0] in r for r in records)]
    count = len(panels) + (1 if retrieval else 0)
    fig, axes = plt.subplots(1, count, figsize=(4.2 * count, 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if retrieval:
        ax = axes[0][-1]
        for key in retrieval:
            points = [(r["step"], r[key]) for r in records if key in r]
            ax.plot(*zip(*points), marker="o", label=key)
        ax.set_title("retrieval")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clicktower plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="a training output folder (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG path (default OUTPUT_DIR/metrics.png)")
    args = parser.parse_args(argv)
    folder = Path(args.output_dir)
    out = Path(args.out) if args.out else folder / "metrics.png"
    plot_metrics(read_metrics(folder / "metrics.jsonl"), out, title=str(folder))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
