"""clicktower slurm: render ``launcher/slurm/train.sbatch`` for a run and submit it with sbatch.

    clicktower slurm submit --config configs/demo.yaml --nodes 4 --gpus-per-node 8 \\
        --time 24:00:00 --accelerate-config configs/accelerate/multinode_ddp.yaml data.train_manifest=...
    clicktower slurm submit --config configs/tiny.yaml --nodes 1 --gpus-per-node 0 --dry-run

The rendered script carries the run's settings (``CLICKTOWER_*`` variables: config, overrides,
accelerate config, processes per node, virtual environment, working folder) and its
``#SBATCH`` lines; on a preemption signal the job checkpoints, requeues itself and resumes.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from clicktower.launcher.errors import ConfigError, run_cli
from clicktower.launcher.slurm import render, submit, template_text

def build_script(args: argparse.Namespace) -> str:
    """The job script for the parsed ``submit`` arguments (config and overrides validated first)."""
    # Imported here, after parsing: --help needs neither torch nor transformers.
    from clicktower.launcher.engine.config import load_config

    config = Path(args.config).resolve()
    load_config(config, args.overrides)  # a typo fails here, not hours later in the queue
    if args.nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node must be >= 0, got {args.gpus_per_node}")
    procs = args.procs_per_node or max(args.gpus_per_node, 1)
    directives = {"job-name": args.job_name, "nodes": str(args.nodes), "ntasks-per-node": "1",
                  "signal": f"B:USR1@{args.grace}"}
    if args.gpus_per_node:
        directives["gpus-per-node"] = str(args.gpus_per_node)
    for key, value in (("cpus-per-task", args.cpus_per_task), ("time", args.time),
                       ("partition", args.partition), ("output", args.output)):
        if value is not None:
            directives[key] = str(value)
    settings = {"CLICKTOWER_CONFIG": str(config), "CLICKTOWER_OVERRIDES": shlex.join(args.overrides),
                "CLICKTOWER_PROCS_PER_NODE": str(procs), "CLICKTOWER_WORKDIR": str(Path.cwd())}
    if args.accelerate_config:
        accelerate_config = Path(args.accelerate_config).resolve()
        if not accelerate_config.is_file():
            raise FileNotFoundError(f"--accelerate-config {args.accelerate_config}: no such file")
        settings["CLICKTOWER_ACCELERATE_CONFIG"] = str(accelerate_config)
    venv = args.venv or (sys.prefix if sys.prefix != sys.base_prefix else None)
    if venv:
        settings["CLICKTOWER_VENV"] = str(Path(venv).resolve())
    return render(template_text(), directives, settings)


def main(argv: list[str] | None = None) -> int:
    """``clicktower slurm``; returns the exit status.

    Args:
        argv: the command's arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="clicktower slurm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("submit", help="render train.sbatch and submit it with sbatch")
    sub.add_argument("--config", required=True, help="experiment YAML file")
    sub.add_argument("--nodes", type=int, required=True, help="number of nodes")
    sub.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (0: CPU only)")
    sub.add_argument("--procs-per-node", type=int, default=None,
                     help="trainer processes per node (default: --gpus-per-node, at least 1)")
    sub.add_argument("--cpus-per-task", type=int, default=None, help="CPUs of each node's task")
    sub.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    sub.add_argument("--partition", default=None)
    sub.add_argument("--accelerate-config", default=None, help="accelerate config file")
    sub.add_argument("--venv", default=None, help="virtual environment to activate (default: this one)")
    sub.add_argument("--job-name", default="clicktower")
    sub.add_argument("--output", default=None, help="job output file (default: clicktower-%%j.out)")
    sub.add_argument("--grace", type=int, default=120,
                     help="seconds between SIGUSR1 and the time limit (one step + a checkpoint)")
    sub.add_argument("--dry-run", action="store_true", help="print the job script instead of submitting")
    sub.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    script = build_script(args)
    if args.dry_run:
        print(script, end="")
        return 0
    print(submit(script), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
