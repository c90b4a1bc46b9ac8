"""clicktower shard: convert click logs (CSV, JSONL, Parquet, HF datasets) into indexed WebDataset shards.

    clicktower shard clicks.csv --out shards --query-field search_term --item-field product_title \
        --item-id-field product_uid --label-field relevance --min-label 2.67
    clicktower shard 'logs/2024-*/part-*.jsonl.gz' --out shards --workers 8 --gzip \
        --shard-size 100000 --max-shard-bytes 256MB --split-bytes 256MB
    clicktower shard logs/2024-06-02.jsonl --out s3://bucket/clicks/v3 --append

--out may be a URL (s3://, gs://, ...: the manifest is uploaded last; credentials and
endpoints come from the store's standard settings, e.g. AWS_ENDPOINT_URL). --append adds the
inputs' shards to the set already there without rewriting it.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from clicktower.data.shards import DEFAULT_SPLIT_BYTES, write_shards
from clicktower.data.sources import FieldMap
from clicktower.launcher.errors import run_cli
from clicktower.launcher.progress import bar

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str) -> int:
    """``"256MB"`` -> 256000000; ``"64MiB"``, ``"1GB"`` and plain integers too."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 256MB, 64MiB)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clicktower shard", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+",
                        help="input files (.csv .tsv .jsonl .parquet, .gz), HF dataset folders, or globs")
    parser.add_argument("--out", required=True,
                        help="output folder or URL (s3://bucket/prefix) for shards and manifest.json")
    parser.add_argument("--query-field", default="query")
    parser.add_argument("--item-field", default="item_text")
    parser.add_argument("--item-id-field", default="item_id")
    parser.add_argument("--item-fields", default=None,
                        help="comma-separated structured item fields (e.g. title,brand,category,attributes)")
    parser.add_argument("--features-field", default=None, help="item feature vector field (stored as .npy)")
    parser.add_argument("--features-file", default=None, metavar="FILE.npy",
                        help="item feature vectors kept apart: a [n, dim] .npy matrix (needs --features-ids)")
    parser.add_argument("--features-ids", default=None, metavar="FILE",
                        help="the item id of each row of --features-file, one per line")
    parser.add_argument("--label-field", default=None, help="numeric label column (e.g. relevance)")
    parser.add_argument("--min-label", type=float, default=None, help="keep rows with label >= this")
    parser.add_argument("--hard-negatives-field", default=None)
    parser.add_argument("--weight-field", default=None,
                        help="non-negative per-sample weight column (graded positives: e.g. the relevance grade)")
    parser.add_argument("--exclude-ids-field", default=None,
                        help="list of item ids the sample's query is never scored against (judged items, "
                             "variants); the loss masks them")
    parser.add_argument("--teacher-field", default=None,
                        help="list of teacher scores: the positive, then each hard negative (distillation, "
                             "loss.distill_weight)")
    parser.add_argument("--shard-size", type=int, default=100_000,
                        help="input records per chunk: at most this many samples per shard")
    parser.add_argument("--max-shard-bytes", type=parse_bytes, default=None,
                        help="also cut a shard before its tar passes this size (e.g. 256MB)")
    parser.add_argument("--gzip", action="store_true", help="write .tar.gz shards (block-indexed)")
    parser.add_argument("--workers", type=int, default=1,
                        help="writer processes; they share the input ranges (see --split-bytes)")
    parser.add_argument("--split-bytes", type=parse_bytes, default=DEFAULT_SPLIT_BYTES,
                        help="cut the inputs into ranges of about this size for the writers "
                             "(uncompressed JSONL by lines, CSV/TSV by records, Parquet by row "
                             "groups; gzip and datasets folders whole); a shard never spans two ranges "
                             "(default 64MiB)")
    replace = parser.add_mutually_exclusive_group()
    replace.add_argument("--overwrite", action="store_true", help="replace an existing shard folder")
    replace.add_argument("--append", action="store_true",
                         help="add the inputs' shards to the shard set at --out (same field mapping "
                              "and --gzip) without rewriting it; the manifest is replaced last")
    parser.add_argument("--force", action="store_true",
                        help="with --append: also append an input the shard set's manifest already lists "
                             "in its sources (refused otherwise: its pairs would be read twice)")
    args = parser.parse_args(argv)
    if args.force and not args.append:
        parser.error("--force goes with --append")
    if args.shard_size < 1:
        parser.error("--shard-size must be >= 1")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.split_bytes < 1:
        parser.error("--split-bytes must be >= 1")
    if (args.features_file is None) != (args.features_ids is None):
        parser.error("--features-file and --features-ids go together")
    if args.features_file is not None and args.features_field is not None:
        parser.error("--features-field and --features-file exclude each other")
    try:
        field_map = FieldMap(query=args.query_field, item_text=args.item_field, item_id=args.item_id_field,
                             label=args.label_field, min_label=args.min_label,
                             hard_negatives=args.hard_negatives_field, weight=args.weight_field,
                             item_fields=args.item_fields.split(",") if args.item_fields else None,
                             features=args.features_field, exclude_ids=args.exclude_ids_field,
                             teacher_scores=args.teacher_field)
    except ValueError as exc:
        parser.error(str(exc))
    shown: list = []  # the bar, made at the first range written (a bad input fails before: one line)

    def progress(done: int, total: int) -> None:  # ranges of about --split-bytes of input each
        if not shown:
            shown.append(bar(total, f"shard -> {args.out}", unit="range"))
        shown[0].update(done - shown[0].n)

    manifest = write_shards(args.inputs, args.out, field_map, shard_size=args.shard_size,
                            overwrite=args.overwrite, workers=args.workers,
                            max_shard_bytes=args.max_shard_bytes, gzip=args.gzip,
                            split_bytes=args.split_bytes, append=args.append, force=args.force,
                            features_file=(args.features_file, args.features_ids) if args.features_file else None,
                            progress=progress)
    for made in shown:
        made.close()
    print(json.dumps({"out": args.out, "num_samples": manifest["num_samples"], "shards": len(manifest["shards"])}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
