"""clicktower embed: embed a catalog on every rank and build a FAISS index.

    clicktower embed --model runs/demo/final --catalog catalog.jsonl --out index/
    clicktower embed ... --dim 128 --precision int8 --index hnsw:32
    accelerate launch -m clicktower.launcher.index --model ... --catalog ... --out index/

Every rank embeds its slice of the catalog and writes it; the main process trains and fills
the index (see ``clicktower.launcher.retrieval.faiss_index`` for the folder layout). The
serving settings (size, precision, index) are recorded in ``index.json`` and applied by
``clicktower search`` and ``clicktower eval --index``.
"""
from __future__ import annotations

import argparse
import json
import sys

from clicktower.launcher.errors import run_cli
from clicktower.launcher.retrieval.defaults import EMBED_BATCH_SIZE
from clicktower.launcher.retrieval.serving import ServingSettings, add_serving_arguments, settings_from_args


def main(argv: list[str] | None = None) -> int:
    """``clicktower embed``; returns the exit status.

    Args:
        argv: the command's arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="clicktower embed", description="embed a catalog and build a FAISS index")
    parser.add_argument("--model", required=True, help="final/ folder or pretrained encoder folder")
    parser.add_argument("--catalog", required=True, help="catalog file (item_id, item_text)")
    parser.add_argument("--out", required=True, help="index folder")
    add_serving_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=EMBED_BATCH_SIZE, help="texts per forward pass")
    parser.add_argument("--features-field", default="features",
                        help="catalog field of the item feature vectors (read when the model fuses them)")
    args = parser.parse_args(argv)
    # Imported after parsing: --help and usage errors need neither torch nor transformers.
    from clicktower.launcher.retrieval.faiss_index import embed_catalog

    try:
        settings = settings_from_args(args) or ServingSettings()
    except ValueError as exc:
        parser.error(str(exc))
    meta = embed_catalog(args.model, args.catalog, args.out, settings, args.batch_size,
                         features_field=args.features_field)
    if meta is not None:
        print(json.dumps({"out": args.out, **meta}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
