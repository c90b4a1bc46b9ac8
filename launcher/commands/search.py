"""clicktower search: the top items of an index for a query.

    clicktower search --index runs/demo/index "cordless drill"
"""
from __future__ import annotations

import argparse
import json
import sys

from clicktower.launcher.errors import run_cli


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
    parser.add_argument("query", nargs="+", help="the query text")
    args = parser.parse_args(argv)
    # Imported after parsing: --help and usage errors need neither torch nor transformers.
    from clicktower.launcher.retrieval.faiss_index import SearchIndex

    query = " ".join(args.query)
    hits = SearchIndex(args.index, args.model).search([query], args.k)[0]
    if args.json:
        print(json.dumps({"query": query, "hits": hits}))
        return 0
    print(f"query: {query}")
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:>3}  {hit['score']:.4f}  {hit['item_id']:<12}  {hit['item_text']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
