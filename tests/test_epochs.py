"""``train.epochs``: optimiser steps from the data, and the keys it excludes."""
from __future__ import annotations

import pytest

from clicktower.launcher.engine.config import load_config
from clicktower.launcher.engine.loop import DEFAULT_MAX_STEPS, TrainConfig, epoch_steps
from clicktower.launcher.errors import ConfigError

from conftest import TINY_CONFIG

pytestmark = pytest.mark.unit


def test_epochs_and_max_steps_exclude_each_other():
    assert TrainConfig().max_steps == DEFAULT_MAX_STEPS == 100 and TrainConfig().epochs is None
    assert TrainConfig(epochs=3).max_steps is None
    with pytest.raises(ValueError, match="train.max_steps or train.epochs, not both"):
        TrainConfig(max_steps=10, epochs=2)
    with pytest.raises(ConfigError, match="not both"):  # the file sets max_steps: 20
        load_config(TINY_CONFIG, ["train.epochs=2"])
    with pytest.raises(ConfigError, match="train.epochs must be >= 1"):
        load_config(TINY_CONFIG, ["train.max_steps=null", "train.epochs=0"])
    assert load_config(TINY_CONFIG, ["train.max_steps=null", "train.epochs=2"]).train.epochs == 2


def test_epochs_are_refused_with_a_mix():
    with pytest.raises(ConfigError, match="train.epochs cannot be used with data.mix"):
        load_config(TINY_CONFIG, ["train.max_steps=null", "train.epochs=1", "data.mix=[{manifest: a, weight: 1}]"])


def test_epoch_steps_count_micro_batches_k_per_step():
    # 3 epochs of 10 batches: 30 micro-batches; 4 per step: 7 steps (2 left over make none).
    assert epoch_steps(3, 10, 1) == 30
    assert epoch_steps(3, 10, 4) == 7
    assert epoch_steps(1, 3, 4) == 0
