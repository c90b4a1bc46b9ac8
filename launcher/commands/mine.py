"""clicktower mine: mine hard negatives with a model into a new shard set.

    clicktower mine --model runs/x/final --manifest work/shards --out work/shards_mined
    accelerate launch -m clicktower.launcher.mine --model ... --manifest ... --out ...

The rules (rank window, margin, exclusions) are those of
``clicktower.launcher.retrieval.mining``; the last stdout line is the JSON summary.
"""
from __future__ import annotations

import argparse
import json
import sys

from clicktower.launcher.errors import run_cli
from clicktower.launcher.retrieval.defaults import EMBED_BATCH_SIZE


def main(argv: list[str] | None = None) -> int:
    """``clicktower mine``; returns the exit status.

    Args:
        argv: the command's arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="clicktower mine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="final/ folder or pretrained encoder folder")
    parser.add_argument("--manifest", required=True, help="input shard manifest (or its folder)")
    parser.add_argument("--out", required=True, help="output shard folder")
    parser.add_argument("--catalog", help="extra candidate items (item_id, item_text)")
    parser.add_argument("--ranks", type=int, nargs=2, default=(10, 100), metavar=("START", "END"),
                        help="1-based inclusive rank window of candidates (default 10 100)")
    parser.add_argument("--margin", type=float, default=0.05,
                        help="drop candidates scoring above the positive's score minus this")
    parser.add_argument("--relative-margin", type=float, default=None, metavar="M",
                        help="also drop candidates scoring above (1 - M) x the positive's score "
                             "(NV-Retriever's TopK-PercPos, e.g. 0.05; default off)")
    parser.add_argument("--sample", choices=("top", "random"), default="top",
                        help="top: the best survivors; random: a seeded random choice inside the rank window")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample random")
    parser.add_argument("--exclude-ids-field", default=None, metavar="NAME",
                        help="sample field listing item ids never used as that sample's negatives "
                             "(e.g. exclude_ids, written by clicktower shard --exclude-ids-field)")
    parser.add_argument("--variant-key", default=None, metavar="REGEX",
                        help="items whose titles agree once the matches are removed are variants; variants "
                             "of a query's clicked items are not its negatives")
    parser.add_argument("--features-field", default="features",
                        help="catalog field of the item feature vectors (read when the model fuses them; "
                             "mined negatives carry their vectors)")
    parser.add_argument("--negatives", type=int, default=5, help="hard negatives per sample")
    parser.add_argument("--teacher", default=None, metavar="DIR",
                        help="a clicktower teacher train folder: drop the mined negatives it scores within "
                             "--teacher-margin of the positive (RocketQA's denoised hard negatives)")
    parser.add_argument("--teacher-margin", type=float, default=0.0, metavar="M",
                        help="with --teacher: drop negatives with teacher(q, neg) > teacher(q, pos) - M (logits)")
    parser.add_argument("--existing", choices=("keep", "merge", "replace"), default=None,
                        help="input samples that already have hard negatives or teacher scores: keep them "
                             "as they are (only the others get mined ones), merge (theirs first, then "
                             "mined; teacher scores dropped) or replace (mined only); without this flag "
                             "such input is refused")
    parser.add_argument("--keep-existing", action="store_true", help="the same as --existing merge")
    parser.add_argument("--batch-size", type=int, default=EMBED_BATCH_SIZE, help="texts per forward pass")
    parser.add_argument("--shard-size", type=int, help="samples per output shard (default: the input's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output shard folder")
    args = parser.parse_args(argv)
    # Imported after parsing: --help and usage errors need neither torch nor transformers.
    from clicktower.launcher.retrieval.mining import mine

    if args.keep_existing and args.existing not in (None, "merge"):
        parser.error("--keep-existing is --existing merge")
    summary = mine(args.model, args.manifest, args.out, args.catalog, tuple(args.ranks), args.margin,
                   args.negatives, "merge" if args.keep_existing else args.existing, args.batch_size,
                   args.shard_size, args.overwrite,
                   relative_margin=args.relative_margin, sample=args.sample, seed=args.seed,
                   exclude_ids_field=args.exclude_ids_field, variant_key=args.variant_key,
                   features_field=args.features_field, teacher=args.teacher,
                   teacher_margin=args.teacher_margin)
    if summary is not None:
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
