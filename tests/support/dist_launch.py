"""`accelerate launch` helpers for the multi-process tests (CPU, gloo, 2 processes)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO, run
from procs import free_port

ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def accelerate_command(config: str, args: list[str],
                       env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """``(command, extra environment)`` of ``accelerate launch --config_file
    configs/accelerate/CONFIG.yaml ARGS`` on the CPU, on a free port: never the user's default
    accelerate config, never the default port 29500.

    Args:
        config: a file name in configs/accelerate/ without ``.yaml``.
        args: what follows the launcher's own flags (``-m clicktower.launcher.train ...``).
        env: extra environment variables.
    """
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    if "zero" not in config:
        # DDP on the CPU; for DeepSpeed configs this flag would make accelerate drop DeepSpeed.
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "configs" / "accelerate" / f"{config}.yaml"),
           "--main_process_port", str(free_port()), *args]
    return cmd, env


def accelerate_launch(config: str, args: list[str], timeout: int = 300,
                      env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``accelerate_command(config, args, env)`` to its end and capture its output.

    Args:
        config: a file name in configs/accelerate/ without ``.yaml``.
        args: what follows the launcher's own flags (``-m clicktower.launcher.train ...``).
        timeout: seconds before the whole process tree is killed.
        env: extra environment variables.
    """
    cmd, env = accelerate_command(config, args, env)
    return run(cmd, cwd=REPO, env=env, timeout=timeout)
