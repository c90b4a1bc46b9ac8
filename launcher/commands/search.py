"""clicktower search: the top items of an index for a query.

    clicktower search --index runs/demo/index "cordless drill"

The index's recorded settings (size, precision, index) apply; ``--dim`` / ``--precision`` /
``--index-type`` serve at others instead, from an index rebuilt in memory from the stored
float32 embeddings.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from clicktower.launcher.errors import run_cli
from clicktower.launcher.retrieval.serving import ServingSettings, add_serving_arguments


def main(argv: list[str] | None = None) -> int:
    """``clicktower search``; returns the exit status.

    Args:
        argv: the command's arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="clicktower search", description="top items for a query")
    parser.add_argument("--index", required=True, help="index folder from clicktower embed")
    parser.add_argument("--model", default=None, help="query model (default: the index's)")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_serving_arguments(parser, "--index-type")
    parser.add_argument("query", nargs="+", help="the query text")
    args = parser.parse_args(argv)
    # Imported after parsing: --help and usage errors need neither torch nor transformers.
    from clicktower.launcher.retrieval.faiss_index import SearchIndex

    query = " ".join(args.query)
    hits = SearchIndex(args.index, args.model, _overrides(args, parser)).search([query], args.k)[0]
    if args.json:
        print(json.dumps({"query": query, "hits": hits}))
        return 0
    print(f"query: {query}")
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:>3}  {hit['score']:.4f}  {hit['item_id']:<12}  {hit['item_text']}")
    return 0


def _overrides(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ServingSettings | None:
    """The folder's settings with the options given replacing theirs (None: no option)."""
    names = {"dim": "dim", "precision": "precision", "index_spec": "index", "nprobe": "nprobe",
             "ef_search": "ef_search", "rescore_multiplier": "rescore_multiplier", "rescore": "rescore",
             "train_sample": "train_sample"}
    given = {field: getattr(args, name) for name, field in names.items() if getattr(args, name) is not None}
    if not given:
        return None
    from pathlib import Path

    meta_path = Path(args.index) / "index.json"
    stored = ServingSettings.from_meta(json.loads(meta_path.read_text())) if meta_path.is_file() else ServingSettings()
    try:
        return dataclasses.replace(stored, **given)
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(run_cli(main))
