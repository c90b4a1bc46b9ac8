"""`accelerate launch` helpers for the multi-process tests (CPU, gloo, 2 processes)."""
from __future__ import annotations

import sys
from pathlib import Path

from conftest import REPO, cli_env
from dist_harness import free_port

import subprocess

ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def accelerate_launch(config: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate/CONFIG.yaml ARGS`` on the CPU."""
    env = cli_env()
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    if "zero" not in config:
        # DDP on the CPU; for DeepSpeed configs this flag would make accelerate drop DeepSpeed.
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "configs" / "accelerate" / f"{config}.yaml"),
           "--main_process_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
