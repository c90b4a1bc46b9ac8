"""clicktower eval: retrieval metrics of a model over a catalog.

    clicktower eval --model runs/demo/final --queries eval.jsonl --catalog catalog.jsonl
    clicktower eval ... --dim 128 --precision int8 --index-type hnsw:32   # index built in memory
    clicktower eval --index runs/demo/index --queries eval.jsonl          # a built index folder

``--model`` is a trained ``final/`` folder (``query_tower/`` + ``item_tower/``) or any
pretrained encoder folder, used for both sides. With serving settings or ``--index``, the
summary adds ``index/<metric>``, ``index/recall@10_vs_exact``, ``index/bytes_per_item`` and
``index/latency_p50_ms`` / ``_p99_ms``. The last stdout line is the JSON summary.
"""
from __future__ import annotations

import argparse
import json
import sys

from clicktower.launcher.errors import run_cli
from clicktower.launcher.retrieval.defaults import EMBED_BATCH_SIZE, MIN_RELEVANCE
from clicktower.launcher.retrieval.serving import add_serving_arguments, settings_from_args


def main(argv: list[str] | None = None) -> int:
    """``clicktower eval``; returns the exit status.

    Args:
        argv: the command's arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="clicktower eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="final/ folder or pretrained encoder folder (with --index: the index's)")
    parser.add_argument("--queries", required=True, help="judged queries JSONL (query, relevance)")
    parser.add_argument("--catalog", help="catalog file (item_id, item_text); not with --index")
    parser.add_argument("--index", help="index folder from clicktower embed: evaluate it at its recorded settings")
    add_serving_arguments(parser, "--index-type")
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
    from clicktower.launcher.retrieval.evaluation import evaluate, evaluate_index

    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.index:
        if args.catalog or settings is not None:
            parser.error("--index evaluates a built index at its recorded settings: no --catalog, --dim, ...")
        summary = evaluate_index(args.index, args.queries, args.model, args.min_relevance, args.per_query)
    elif not (args.model and args.catalog):
        parser.error("--model and --catalog are required (or --index)")
    else:
        summary = evaluate(args.model, args.queries, args.catalog, args.min_relevance, args.batch_size, args.mode,
                           args.per_query, args.features_field, args.train_manifest, args.on_error, settings=settings)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
