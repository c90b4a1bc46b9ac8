"""The precision and numerics a run trains with: ``train.mixed_precision`` null takes the
launcher's (``ACCELERATE_MIXED_PRECISION``, which ``accelerate launch`` sets from its config
or ``--mixed_precision``), an explicit value wins, ``train.deterministic`` null is true on a
CPU and false on a GPU, and ``config.yaml`` (and every checkpoint's) records what was resolved."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from clicktower.launcher.engine.distributed import accelerator_kwargs, resolve_numerics, set_numerics
from clicktower.launcher.engine.loop import TrainConfig
from clicktower.launcher.errors import ConfigError

from conftest import TINY_CONFIG
from dist_launch import accelerate_launch


@pytest.fixture
def fresh_accelerate(monkeypatch):
    """accelerate's state is a process-wide singleton: start and leave it unset, with no
    launcher precision in the environment unless a test sets one."""
    from accelerate.state import AcceleratorState

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _accelerator(configured: str | None):
    from accelerate import Accelerator

    return Accelerator(cpu=True, **accelerator_kwargs(None, configured))


@pytest.mark.unit
@pytest.mark.parametrize("launcher, configured, expected", [
    (None, None, "no"),        # nobody asks: fp32
    ("bf16", None, "bf16"),    # null: the launcher's
    ("no", None, "no"),
    ("bf16", "no", "no"),      # an explicit value wins over the launcher's
    ("no", "bf16", "bf16"),
    (None, "bf16", "bf16"),
])
def test_precision_null_takes_the_launchers_and_an_explicit_value_wins(fresh_accelerate, monkeypatch, launcher,
                                                                        configured, expected):
    if launcher is not None:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    accelerator = _accelerator(configured)
    train = resolve_numerics(accelerator, TrainConfig(mixed_precision=configured))
    assert train.mixed_precision == accelerator.mixed_precision == expected
    assert train.deterministic is True  # null on a CPU


@pytest.mark.unit
def test_accelerator_gets_a_precision_only_when_the_config_sets_one():
    assert "mixed_precision" not in accelerator_kwargs(None, None)
    assert accelerator_kwargs(None, "bf16")["mixed_precision"] == "bf16"


@pytest.mark.unit
@pytest.mark.parametrize("device, configured, expected", [
    ("cpu", None, True), ("cuda", None, False), ("cpu", False, False), ("cuda", True, True)])
def test_deterministic_null_is_true_on_cpu_false_on_gpu(device, configured, expected):
    accelerator = SimpleNamespace(mixed_precision="no", device=torch.device(device))
    train = resolve_numerics(accelerator, TrainConfig(deterministic=configured))
    assert train.deterministic is expected
    assert train.mixed_precision == "no"


@pytest.mark.unit
def test_a_precision_accelerate_does_not_train_in_is_an_error():
    """Under DeepSpeed the DeepSpeed file's fp16/bf16 settings overrule what was passed
    (the shipped files have fp16 disabled): asked for fp16, it would silently train in fp32."""
    accelerator = SimpleNamespace(mixed_precision="no", device=torch.device("cuda"))
    with pytest.raises(ConfigError, match="train.mixed_precision=fp16 but accelerate trains in no"):
        resolve_numerics(accelerator, TrainConfig(mixed_precision="fp16"))


@pytest.mark.unit
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_fp16_needs_a_gpu():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        accelerator_kwargs(None, "fp16")


@pytest.fixture
def restore_numerics():
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.utils.deterministic.fill_uninitialized_memory = saved[2]
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[3], saved[4]


@pytest.mark.unit
def test_numerics_deterministic_kernels_or_tf32(restore_numerics, monkeypatch):
    # (set first: monkeypatch then removes what set_numerics adds when the test ends)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    torch.backends.cuda.matmul.allow_tf32 = False
    set_numerics(torch.device("cpu"), True)
    assert torch.are_deterministic_algorithms_enabled()
    # No NaN fill of torch.empty: DeepSpeed allocates its reduce bucket every step.
    assert torch.utils.deterministic.fill_uninitialized_memory is False
    assert torch.backends.cuda.matmul.allow_tf32 is False  # CPU: TF32 flags untouched
    set_numerics(torch.device("cpu"), False)
    assert not torch.are_deterministic_algorithms_enabled()
    # The flags are plain settings: they can be checked without a GPU.
    set_numerics(torch.device("cuda"), False)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    set_numerics(torch.device("cuda"), True)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # cuBLAS's deterministic workspace


def _launch(out: Path, shard_dir: Path, *overrides: str) -> list[float]:
    """2 steps of the tiny BERT under ``accelerate launch --mixed_precision bf16`` (one CPU
    process), a checkpoint at step 2; returns the losses."""
    result = accelerate_launch("cpu_1proc", [
        "--mixed_precision", "bf16", "-m", "clicktower.launcher.train", "--config", str(TINY_CONFIG),
        f"data.train_manifest={shard_dir}", f"train.output_dir={out}", "train.max_steps=2",
        "train.log_every_steps=1", "train.progress_bar=false", "checkpoint.every_steps=2", *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _recorded(out: Path) -> list[tuple]:
    """(mixed_precision, deterministic) in config.yaml and in the run's checkpoint."""
    files = [out / "config.yaml", *sorted((out / "checkpoints").glob("step_*/config.yaml"))]
    assert len(files) == 2, files
    return [(t["mixed_precision"], t["deterministic"]) for t in (yaml.safe_load(f.read_text())["train"] for f in files)]


@pytest.mark.e2e
@pytest.mark.slow
def test_accelerate_launch_bf16_trains_in_bf16_unless_the_config_says_otherwise(shard_dir, tmp_path):
    """``accelerate launch --mixed_precision bf16`` (what an accelerate config's
    ``mixed_precision: bf16`` becomes) with ``train.mixed_precision`` unset trains in bf16 and
    records it; the same launch with ``train.mixed_precision=no`` trains in fp32 and says so."""
    bf16 = _launch(tmp_path / "bf16", shard_dir)
    assert _recorded(tmp_path / "bf16") == [("bf16", True)] * 2
    # Quoted: YAML reads a bare no as false.
    fp32 = _launch(tmp_path / "fp32", shard_dir, 'train.mixed_precision="no"')
    assert _recorded(tmp_path / "fp32") == [("no", True)] * 2
    # bf16 autocast rounds the encoder's matmuls: other losses, but close ones.
    assert bf16[0] != fp32[0]
    assert bf16[0] == pytest.approx(fp32[0], rel=0.05)
