"""clicktower synth: write a deterministic synthetic click log (train, catalog, eval)."""
from __future__ import annotations

import argparse
import json
import sys

from clicktower.data.synth import generate
from clicktower.launcher.errors import run_cli


def zipf_exponent(text: str) -> float:
    """``"zipf:1.2"`` -> 1.2 (an exponent >= 0)."""
    kind, _, value = text.partition(":")
    try:
        exponent = float(value)
    except ValueError:
        exponent = -1.0
    if kind != "zipf" or not 0 <= exponent < float("inf"):
        raise argparse.ArgumentTypeError(f"not a popularity law: {text!r} (e.g. zipf:1.2; zipf:0 is uniform)")
    return exponent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clicktower synth", description=__doc__)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--pairs", type=int, required=True, help="click pairs in train.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--items", type=int, default=None, help="catalog size (default: pairs / 10)")
    parser.add_argument("--eval-queries", type=int, default=None, help="held-out judged queries")
    parser.add_argument("--image-features", type=int, default=None, metavar="DIM",
                        help="add a DIM-long 'features' vector per product (an 'image' showing colour and "
                             "material, which some titles then leave out) to train.jsonl and catalog.jsonl")
    parser.add_argument("--popularity", type=zipf_exponent, default=1.05, metavar="zipf:S",
                        help="click popularity over products: Zipf with exponent S (rank r drawn in "
                             "proportion to 1 / r^S; zipf:0 is uniform; default zipf:1.05)")
    parser.add_argument("--cold-items", type=int, default=0, metavar="K",
                        help="K products no training pair clicks (still in the catalog and the judgements)")
    parser.add_argument("--hard-negatives", type=int, default=None, metavar="K",
                        help="add to every train.jsonl row K hard negatives (negs), an engagement grade "
                             "(grade), the judged-relevant unclicked ids (judged) and teacher scores (teacher)")
    args = parser.parse_args(argv)
    # generate() checks the values (some only it can: --cold-items against the catalog size),
    # each a one-line error with exit status 2.
    counts = generate(args.out, args.pairs, args.seed, args.items, args.eval_queries, zipf_exponent=args.popularity,
                      image_features=args.image_features, cold_items=args.cold_items,
                      hard_negatives=args.hard_negatives)
    print(json.dumps({"out": args.out, **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
