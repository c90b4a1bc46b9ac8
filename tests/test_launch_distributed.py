"""`accelerate launch` end to end on the tiny BERT, 10 steps, 2 CPU processes: DDP and
DeepSpeed ZeRO-1/2/3 (the committed configs/accelerate files) give the loss trajectory of
ONE process training on the whole 2 x 16 global batch, within 1e-4; ZeRO-3 saves the
gathered (not partitioned) weights. Turning cross-device negatives off changes it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_CONFIG
from dist_launch import accelerate_launch

STEPS = 10
# Blocks of one sample dealt round-robin and shuffle windows of one batch: the same global
# batch at every step on any world size (the default order differs per world size, each
# exactly-once; see docs/data.md), so that 1 and 2 processes can be compared step by step.
SAME_BATCHES = ("data.block_size=1", "data.interleave_shards=1", "data.shuffle_buffer=1")


def _train(config: str, shard_dir: Path, out: Path, batch: int, *extra: str) -> list[float]:
    result = accelerate_launch(config, [
        "-m", "clicktower.launcher.train", "--config", str(TINY_CONFIG), f"data.train_manifest={shard_dir}",
        f"train.output_dir={out}", f"train.max_steps={STEPS}", "train.log_every_steps=1",
        "train.progress_bar=false", f"train.batch_size={batch}", *SAME_BATCHES, *extra])
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return [r["loss"] for r in records]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "final" / "query_tower" / "model.safetensors")


@pytest.fixture(scope="module")
def single(shard_dir, tmp_path_factory) -> tuple[list[float], Path]:
    out = tmp_path_factory.mktemp("one") / "run"
    return _train("cpu_1proc", shard_dir, out, 32), out


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("config", ["cpu_2proc_ddp", "cpu_2proc_zero1", "cpu_2proc_zero2", "cpu_2proc_zero3"])
def test_two_processes_match_one_process_on_the_global_batch(single, shard_dir, tmp_path, config):
    losses = _train(config, shard_dir, tmp_path / "run", 16)
    assert losses == pytest.approx(single[0], abs=1e-4)
    assert losses[-1] < losses[0]
    if config == "cpu_2proc_zero3":
        import torch

        ref = _weights(single[1])
        for name, tensor in _weights(tmp_path / "run").items():
            torch.testing.assert_close(tensor, ref[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.e2e
def test_local_negatives_only_is_a_different_run(single, shard_dir, tmp_path):
    losses = _train("cpu_2proc_ddp", shard_dir, tmp_path / "run", 16, "loss.cross_device=false")
    assert abs(losses[0] - single[0][0]) > 0.1  # 16 negatives per query instead of 32


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "accelerate").glob("*.yaml")))
def test_accelerate_configs_load_and_name_existing_deepspeed_files(name):
    """The GPU, multi-node and CPU launch files are valid accelerate configs (they cannot all be
    run here): each loads, and its DeepSpeed file exists."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO / "configs" / "accelerate" / name))
    assert cfg.num_processes >= 1
    if cfg.distributed_type.value == "DEEPSPEED":
        assert (REPO / cfg.deepspeed_config["deepspeed_config_file"]).is_file()


@pytest.mark.unit
@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_deepspeed_configs_parse(name, monkeypatch):
    """DeepSpeed accepts each shipped file once the values the trainer fills are in (the
    ZeRO-3 offload file is never run on CI's CPU)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = json.loads((REPO / "configs" / "deepspeed" / f"{name}.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=4, train_batch_size=4, gradient_clipping=1.0, bf16={"enabled": True})
    parsed = DeepSpeedConfig(cfg)
    assert parsed.zero_optimization_stage == int(name[4])
    assert (parsed.zero_config.offload_optimizer is not None) == name.endswith("offload")
