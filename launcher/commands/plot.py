"""clicktower plot OUTPUT_DIR: loss, temperature, throughput and retrieval metrics against step.

Reads ``OUTPUT_DIR/metrics.jsonl`` and writes ``OUTPUT_DIR/metrics.png`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clicktower.launcher.engine.metrics import plot_metrics, read_metrics
from clicktower.launcher.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    """``clicktower plot``; returns the exit status.

    Args:
        argv: the command's arguments (default: ``sys.argv[1:]``).
    """
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
