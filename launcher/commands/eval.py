"""clicktower eval: retrieval metrics of a model over a catalog.

    clicktower eval --model runs/demo/final --queries eval.jsonl --catalog catalog.jsonl

``--model`` is a trained ``final/`` folder (``query_tower/`` + ``item_tower/``) or any
pretrained encoder folder, used for both sides. The last stdout line is the JSON summary.
"""
from __future__ import annotations

import argparse
import json
import sys

from clicktower.launcher.errors import run_cli
from clicktower.launcher.retrieval.defaults import EMBED_BATCH_SIZE, MIN_RELEVANCE


def main(argv: list[str] | None = None) -> int:
    """``clicktower eval``; returns the exit status.

    Args:
        argv: the command's arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="clicktower eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="final/ folder or pretrained encoder folder")
    parser.add_argument("--queries", required=True, help="judged queries JSONL (query, relevance)")
    parser.add_argument("--catalog", required=True, help="catalog file (item_id, item_text)")
    parser.add_argument("--min-relevance", type=float, default=MIN_RELEVANCE, help="grade counted as relevant")
    parser.add_argument("--mode", choices=("full", "rerank"), default="full",
                        help="full-catalog retrieval, or reranking each query's judged items")
    parser.add_argument("--batch-size", type=int, default=EMBED_BATCH_SIZE, help="texts per forward pass")
    parser.add_argument("--per-query", help="write per-query metrics to this JSONL file")
    parser.add_argument("--features-field", default="features",
                        help="catalog field of the item feature vectors (read when the model fuses them)")
    parser.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                        help="a bad catalog vector: embed the item without it (counted), or stop")
    parser.add_argument("--train-manifest", metavar="M",
                        help="training shard set: also report cold/<metric> (queries whose relevant items "
                             "were never a positive in M) and warm/<metric>")
    args = parser.parse_args(argv)
    # Imported after parsing: --help and usage errors need neither torch nor transformers.
    from clicktower.launcher.retrieval.evaluation import evaluate

    summary = evaluate(args.model, args.queries, args.catalog, args.min_relevance, args.batch_size,
                       args.mode, args.per_query, args.features_field, args.train_manifest, args.on_error)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
