"""Config parsing: YAML + dotted overrides into typed, validated dataclasses."""
from __future__ import annotations

import pytest

from clicktower.launcher.engine.config import ConfigError, ExperimentConfig, load_config

from conftest import TINY_CONFIG

pytestmark = pytest.mark.unit


def test_yaml_and_overrides_build_typed_sections(tmp_path):
    cfg = load_config(TINY_CONFIG, ["train.max_steps=7", "optim.lr=1e-4", "data.train_manifest=/x/m.json",
                                    "model.bert_config.hidden_size=64", "loss.symmetric=false"])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.train_manifest == "/x/m.json"
    assert cfg.model.bert_config["hidden_size"] == 64
    assert cfg.loss.symmetric is False


def test_required_keys_exist_with_their_names():
    cfg = load_config(None, ["model.name_or_path=/m", "data.train_manifest=/d", "train.batch_size=8",
                             "train.max_steps=3", "train.output_dir=/o", "train.seed=5",
                             "train.log_every_steps=2", "optim.lr=0.5"])
    assert (cfg.train.batch_size, cfg.train.seed, cfg.train.log_every_steps) == (8, 5, 2)


def test_int_given_to_a_float_is_widened_and_number_to_str_kept_as_text():
    cfg = load_config(TINY_CONFIG, ["optim.lr=1", "train.output_dir=123"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.output_dir == "123"


@pytest.mark.parametrize("override, message", [
    ("train.max_step=3", "unknown key train.max_step"),
    ("trian.max_steps=3", "unknown key trian"),
    ("train.max_steps=ten", "train.max_steps: expected an integer, got 'ten'"),
    ("train.max_steps=2.5", "train.max_steps: expected an integer"),
    ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
    ("loss.symmetric=maybe", "loss.symmetric: expected true or false"),
    ("model.pooling=max", "model.pooling: must be one of 'mean', 'cls'"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("train.max_steps", "expected key.sub=value"),
    ("train.max_steps.x=1", "max_steps is not a section"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY_CONFIG, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_typo_in_yaml_file_names_key_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stpes: 10\n")
    with pytest.raises(ConfigError, match="unknown key train.max_stpes"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    bad.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_config(bad)


def test_model_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one of model.name_or_path and model.bert_config"):
        load_config(TINY_CONFIG, ["model.name_or_path=/m"])


def test_precision_and_determinism_default_to_null_and_parse():
    cfg = load_config(TINY_CONFIG)
    assert (cfg.train.mixed_precision, cfg.train.deterministic) == (None, None)  # resolved at launch
    cfg = load_config(TINY_CONFIG, ["train.mixed_precision=fp16", "train.deterministic=true"])
    assert (cfg.train.mixed_precision, cfg.train.deterministic) == ("fp16", True)
    cfg = load_config(TINY_CONFIG, ["train.mixed_precision=bf16", "train.mixed_precision=null"])
    assert cfg.train.mixed_precision is None
    with pytest.raises(ConfigError, match="train.mixed_precision: must be one of 'no', 'bf16', 'fp16', got 'fp8'"):
        load_config(TINY_CONFIG, ["train.mixed_precision=fp8"])
    from clicktower.launcher.engine.loop import TrainConfig

    with pytest.raises(ValueError, match="train.mixed_precision must be one of no, bf16, fp16 or null"):
        TrainConfig(mixed_precision="fp32")


@pytest.mark.parametrize("name", sorted(p.name for p in TINY_CONFIG.parent.glob("*.yaml")))
def test_shipped_experiment_configs_leave_precision_to_the_launcher(name):
    """A precision pinned in an experiment config would override the accelerate config's
    (``configs/accelerate/gpu8_*.yaml`` say bf16)."""
    cfg = load_config(TINY_CONFIG.parent / name)
    assert cfg.train.mixed_precision is None
