"""clicktower ckpt: checkpoint utilities.

    clicktower ckpt convert runs/x/checkpoints/step_00001000 --out runs/y/checkpoints/step_00001000
    clicktower ckpt convert runs/x/checkpoints/step_00001000 --out runs/y/uni_1000 --to universal --workers 8

``convert`` turns a DeepSpeed ZeRO-1/2/3 checkpoint (per-rank shards under ``pytorch_model/``)
into an accelerate checkpoint without DeepSpeed (``--to ddp``: ``model.safetensors`` with
consolidated fp32 weights, ``optimizer.bin`` with every parameter's AdamW moments and step, the
scheduler, RNG files, trainer state and config) that resumes on any number of processes with
DDP or on one process, or into DeepSpeed's universal checkpoint (``--to universal``) that
resumes under the same ZeRO stage on any number of processes: ``train.resume=OUT``. Resuming a
ZeRO checkpoint without DeepSpeed, or under ZeRO on another number of processes, converts on
the fly; this command is for doing it once, offline (``--workers`` processes in parallel).
"""
from __future__ import annotations

import argparse
import json
import sys

from clicktower.launcher.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clicktower ckpt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    convert = sub.add_parser("convert", help="DeepSpeed ZeRO checkpoint -> accelerate (DDP) checkpoint")
    convert.add_argument("checkpoint", help="a complete checkpoint folder with ZeRO shards (pytorch_model/)")
    convert.add_argument("--out", required=True, help="output checkpoint folder (must not exist)")
    convert.add_argument("--to", choices=["ddp", "universal"], default="ddp",
                         help="target format: ddp (accelerate without DeepSpeed; any world size) or universal "
                              "(DeepSpeed ZeRO, same stage, any world size)")
    convert.add_argument("--workers", type=int, default=1,
                         help="--to universal: processes extracting and merging the shards")
    args = parser.parse_args(argv)
    from pathlib import Path

    from clicktower.launcher.engine.checkpoint import check_checkpoint, convert_to_ddp, convert_to_universal

    problem = check_checkpoint(Path(args.checkpoint), verify_checksums=True) if Path(args.checkpoint).is_dir() \
        else "no such folder"
    if problem:
        raise FileNotFoundError(f"{args.checkpoint}: not a usable checkpoint: {problem}")
    if args.to == "universal":
        summary = convert_to_universal(args.checkpoint, args.out, workers=max(1, args.workers))
    else:
        summary = convert_to_ddp(args.checkpoint, args.out)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
