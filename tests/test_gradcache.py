"""GradCache (train.grad_cache_chunk) makes the same parameter update as one big backward:
2 processes under DDP, DeepSpeed ZeRO-2 and ZeRO-3, through `accelerate launch` and the real
Trainer.train_step (dropout off, fp32, SGD lr 1 so the update is the gradient; 8 pairs per
rank in chunks of 3, 3 and 2; two steps)."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dist_launch import accelerate_launch

HELPER = str(Path(__file__).with_name("dist_gradcache.py"))


def _run(config: str, chunk: str, out: Path) -> dict:
    result = accelerate_launch(config, [HELPER, str(out), chunk])
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return _run("cpu_2proc_ddp", "none", tmp_path_factory.mktemp("gc") / "ref.pt")


@pytest.mark.parametrize("config", ["cpu_2proc_ddp", "cpu_2proc_zero2", "cpu_2proc_zero3"])
def test_chunked_update_equals_unchunked(reference, config, tmp_path):
    chunked = _run(config, "3", tmp_path / "chunked.pt")
    assert chunked["losses"] == pytest.approx(reference["losses"], abs=1e-6)
    moved = 0.0
    for name, ref in reference["params"].items():
        torch.testing.assert_close(chunked["params"][name], ref, rtol=1e-5, atol=1e-5, msg=name)
        moved = max(moved, float(ref.abs().max()))
    assert moved > 0


def test_unchunked_zero2_equals_ddp(reference, tmp_path):
    plain = _run("cpu_2proc_zero2", "none", tmp_path / "plain.pt")
    for name, ref in reference["params"].items():
        torch.testing.assert_close(plain["params"][name], ref, rtol=1e-5, atol=1e-5, msg=name)


def _fake_accelerator(steps: int, deepspeed_config: dict | None = None) -> SimpleNamespace:
    plugin = None if deepspeed_config is None else SimpleNamespace(deepspeed_config=deepspeed_config)
    return SimpleNamespace(gradient_accumulation_steps=steps, num_processes=2,
                           state=SimpleNamespace(deepspeed_plugin=plugin))


def test_gradient_accumulation_warns_that_it_shrinks_the_negative_pool(caplog, monkeypatch):
    """Plain accumulation (from accelerate or from the DeepSpeed file) is flagged by the
    launch checks the entry point runs; GradCache is the suggested fix; none without it."""
    from clicktower.launcher.distributed import prepare_launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with caplog.at_level(logging.WARNING, logger="clicktower"):
        prepare_launch(_fake_accelerator(1), 8, None)
        assert not caplog.records
        prepare_launch(_fake_accelerator(4), 8, None)
        ds_config = {"gradient_accumulation_steps": 3}
        prepare_launch(_fake_accelerator(1, ds_config), 8, None)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "gradient_accumulation_steps=4" in messages[0] and "8 x 2 pairs" in messages[0]
    assert "gradient_accumulation_steps=3" in messages[1]
    assert all("train.grad_cache_chunk" in m for m in messages)
    assert ds_config["train_batch_size"] == 8 * 3 * 2
