"""clicktower shard: convert click logs (CSV, JSONL, Parquet, HF datasets) into WebDataset shards.

    clicktower shard clicks.csv --out shards --query-field search_term --item-field product_title \
        --item-id-field product_uid --label-field relevance --min-label 2.67
"""
from __future__ import annotations

import argparse
import json
import sys

from clicktower.data.shards import write_shards
from clicktower.data.sources import FieldMap
from clicktower.launcher.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clicktower shard", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="input files (.csv .tsv .jsonl .parquet, .gz) or HF dataset folders")
    parser.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    parser.add_argument("--query-field", default="query")
    parser.add_argument("--item-field", default="item_text")
    parser.add_argument("--item-id-field", default="item_id")
    parser.add_argument("--label-field", default=None, help="numeric label column (e.g. relevance)")
    parser.add_argument("--min-label", type=float, default=None, help="keep rows with label >= this")
    parser.add_argument("--hard-negatives-field", default=None)
    parser.add_argument("--weight-field", default=None)
    parser.add_argument("--shard-size", type=int, default=100_000, help="samples per shard")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing shard folder")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size must be >= 1")
    try:
        field_map = FieldMap(query=args.query_field, item_text=args.item_field, item_id=args.item_id_field,
                             label=args.label_field, min_label=args.min_label,
                             hard_negatives=args.hard_negatives_field, weight=args.weight_field)
    except ValueError as exc:
        parser.error(str(exc))
    manifest = write_shards(args.inputs, args.out, field_map, shard_size=args.shard_size, overwrite=args.overwrite)
    print(json.dumps({"out": args.out, "num_samples": manifest["num_samples"], "shards": len(manifest["shards"])}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
