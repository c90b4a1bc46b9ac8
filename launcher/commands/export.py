"""clicktower export: checkpoint to Hugging Face + sentence-transformers folders and one
sentence-transformers model (query and document routes) with a model card.

    clicktower export runs/x/checkpoints/step_00001000 --out exported/

The input is a checkpoint folder of any ZeRO stage or a ``final/`` folder; the output is both
towers as Hugging Face and sentence-transformers folders, and ONE sentence-transformers model
(``exported/sentence_transformers/router``: ``encode_query`` / ``encode_document``) with a
model card. The layout is described in ``clicktower.launcher.engine.export``; ``--onnx`` adds
``exported/onnx/`` (``clicktower.launcher.engine.onnx_export``).
"""
from __future__ import annotations

import argparse
import json
import sys

from clicktower.launcher.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    """``clicktower export``; returns the exit status.

    Args:
        argv: the command's arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="clicktower export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint folder (any ZeRO stage) or final/ folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--onnx", action="store_true",
                        help="also write each tower as ONNX (DIR/onnx/, tokenizer beside it), checked with onnxruntime")
    parser.add_argument("--onnx-fused", action="store_true",
                        help="--onnx with onnxruntime's transformer fusions (faster there; onnxruntime-only graphs)")
    args = parser.parse_args(argv)
    # Imported after parsing: --help and usage errors need neither torch nor transformers.
    from clicktower.launcher.engine.export import export

    print(json.dumps(export(args.checkpoint, args.out, args.onnx, args.onnx_fused)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
