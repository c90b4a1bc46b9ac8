"""The shipped launch configs: ZeRO-3 builds the encoder partitioned (``zero3_init_flag: true``),
the DeepSpeed files size their buckets instead of taking DeepSpeed's 5e8-element defaults, and
a pretrained encoder loaded inside ``deepspeed.zero.Init`` trains the DDP trajectory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import MINILM, REPO, TINY_CONFIG
from dist_launch import accelerate_launch

ACCELERATE = REPO / "configs" / "accelerate"
DEEPSPEED = REPO / "configs" / "deepspeed"


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(p.name for p in ACCELERATE.glob("*zero3*.yaml")))
def test_zero3_launch_configs_build_the_model_partitioned(name):
    cfg = yaml.safe_load((ACCELERATE / name).read_text())
    assert cfg["deepspeed_config"]["zero3_init_flag"] is True


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(p.name for p in DEEPSPEED.glob("*.json")))
def test_deepspeed_files_size_their_buckets(name):
    """DeepSpeed's default reduce bucket is 5e8 elements (2 GiB fp32, 1 GiB bf16 per rank),
    sized for billion-parameter models; ours are 10x smaller (docs/distributed.md)."""
    zero = json.loads((DEEPSPEED / name).read_text())["zero_optimization"]
    assert zero["reduce_bucket_size"] <= 5e7
    if zero["stage"] < 3:
        assert zero["allgather_bucket_size"] <= 5e7


def _losses(config: str, shard_dir: Path, out: Path) -> list[float]:
    result = accelerate_launch(config, [
        "-m", "clicktower.launcher.train", "--config", str(TINY_CONFIG), f"data.train_manifest={shard_dir}",
        f"train.output_dir={out}", "model.bert_config=null", f"model.name_or_path={MINILM}", "model.tokenizer=null",
        "model.projection_dim=null", "model.dropout=0.0", "train.batch_size=4", "train.max_steps=2",
        "train.log_every_steps=1", "train.progress_bar=false"])
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
@pytest.mark.slow
def test_zero3_init_with_a_pretrained_encoder_follows_ddp(shard_dir, tmp_path):
    """MiniLM from ``from_pretrained`` under ``deepspeed.zero.Init`` (each rank holds its
    partition only, from the start): 2 steps on 2 CPU ranks give DDP's losses. (Parameters
    are empty 1-D partitions there; the optimiser groups them by their real shape.)"""
    ddp = _losses("cpu_2proc_ddp", shard_dir, tmp_path / "ddp")
    zero3 = _losses("cpu_2proc_zero3", shard_dir, tmp_path / "zero3")
    assert zero3 == pytest.approx(ddp, abs=1e-4)
