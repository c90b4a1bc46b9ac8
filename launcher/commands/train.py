"""clicktower train: train a two-tower retrieval model from a YAML config.

    clicktower train --config configs/demo.yaml train.max_steps=50
    accelerate launch -m clicktower.launcher.train --config configs/demo.yaml

The work is ``clicktower.launcher.engine.training.train``; this is its command line: parse,
load the config, train, report: the final towers' folder last, or, after a stop checkpoint
(SIGTERM, SIGUSR1, Ctrl-C), the command that resumes, with exit 75 (for requeueing).
"""
from __future__ import annotations

import argparse
import os
import sys

from clicktower.launcher.errors import run_cli


def parse_args(argv: list[str] | None) -> tuple[str, list[str]]:
    """The config path and the ``key.sub=value`` overrides.

    Args:
        argv: the command's arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="clicktower train", description=__doc__.split("\n\n")[0],
                                     epilog="Every config key with its type, default and meaning: clicktower config "
                                            "(or docs/config.md); the values a run would use: clicktower config "
                                            "--config FILE [overrides].")
    parser.add_argument("--config", required=True, help="experiment YAML file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=20")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def main(argv: list[str] | None = None) -> int:
    """``clicktower train``; returns the exit status.

    Args:
        argv: the command's arguments (default: ``sys.argv[1:]``).
    """
    config_path, overrides = parse_args(argv)
    # Imported after parsing: --help and usage errors need neither torch nor transformers.
    from clicktower.launcher.engine.config import load_config
    from clicktower.launcher.engine.preemption import EXIT_PREEMPTED, Preempted, resume_command
    from clicktower.launcher.engine.training import train

    cfg = load_config(config_path, overrides)
    # One line per job, not per rank (the launcher sets RANK for every worker).
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        final = train(cfg)
    except Preempted as stop:
        if main_rank:
            launched = argv is None and "LOCAL_RANK" in os.environ
            command = resume_command(sys.argv[1:] if argv is None else argv, cfg.train.resume, launched)
            print(f"{stop}\nresume with: {command}", flush=True)
        return EXIT_PREEMPTED
    if main_rank:
        print(f"saved the trained model: {final}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
