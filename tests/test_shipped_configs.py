"""Every shipped config loads and validates: experiment YAMLs through load_config, accelerate
configs as YAML naming existing DeepSpeed files, DeepSpeed files as JSON."""
from __future__ import annotations

import json

import pytest
import yaml

from clicktower.launcher.engine.config import load_config

from conftest import REPO

CONFIGS = REPO / "configs"
EXPERIMENTS = sorted(CONFIGS.glob("*.yaml"))
ACCELERATE = sorted((CONFIGS / "accelerate").glob("*.yaml"))
DEEPSPEED = sorted((CONFIGS / "deepspeed").glob("*.json"))


@pytest.mark.unit
def test_the_cluster_configs_ship():
    assert {"bert_base_8gpu.yaml", "bert_large_multinode.yaml", "demo.yaml", "tiny.yaml"} <= {p.name for p in EXPERIMENTS}


@pytest.mark.unit
@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_config_validates_and_pins_no_precision(path):
    cfg = load_config(path)
    # Precision comes from the launcher (the accelerate config), never from the experiment.
    assert cfg.train.mixed_precision is None, path
    assert "mixed_precision" not in (yaml.safe_load(path.read_text()).get("train") or {})


@pytest.mark.unit
@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_names_an_existing_deepspeed_file(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["num_processes"] >= 1 and cfg["distributed_type"] in {"NO", "MULTI_GPU", "MULTI_CPU", "DEEPSPEED"}
    ds = (cfg.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if cfg["distributed_type"] == "DEEPSPEED":
        assert ds and (REPO / ds).is_file(), ds
        stage = json.loads((REPO / ds).read_text())["zero_optimization"]["stage"]
        if stage == 3 and not path.name.startswith("cpu_"):
            assert cfg["deepspeed_config"]["zero3_init_flag"] is True  # towers built partitioned


@pytest.mark.unit
@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.name)
def test_deepspeed_config_is_json_with_auto_batch_and_clipping(path):
    ds = json.loads(path.read_text())
    # The trainer fills these from train.batch_size and optim.max_grad_norm; a fixed value
    # would be checked against them at launch.
    assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["gradient_clipping"] == "auto"
