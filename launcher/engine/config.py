"""Experiment configuration: the sections of one experiment, composed.

Each component owns its config dataclass next to its code (``TwoTowerConfig`` in
``clicktower.modeling.towers``, ``DataConfig`` in ``clicktower.data.loader``, ``TrainConfig``
in ``clicktower.launcher.engine.loop`` ...) and validates itself in ``__post_init__``. This
module only composes them; ``schema`` turns YAML plus ``key.sub=value`` overrides into
instances, so that unknown keys and bad types fail before any work starts, with the offending
key named. None of the components imports this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clicktower.data.loader import DataConfig
from clicktower.launcher.engine.checkpoint import CheckpointConfig
from clicktower.launcher.engine.loop import TrainConfig
from clicktower.launcher.engine.optim import OptimConfig
from clicktower.launcher.engine.periodic_eval import EvalConfig
from clicktower.launcher.engine.schema import from_dict, read_yaml_sections, to_dict
from clicktower.launcher.errors import ConfigError
from clicktower.modeling.losses import LossConfig
from clicktower.modeling.towers import TwoTowerConfig

__all__ = ["ConfigError", "ExperimentConfig", "load_config", "to_dict"]


@dataclass
class ExperimentConfig:
    """The whole experiment: one section per component."""

    data: DataConfig = field(default_factory=DataConfig)
    model: TwoTowerConfig = field(default_factory=TwoTowerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        # Checks that span sections; each section validated itself already.
        if self.train.epochs is not None and self.data.mix is not None:
            # A mix is an endless weighted stream: it has no epoch to count.
            raise ValueError("train.epochs cannot be used with data.mix (an endless stream); set train.max_steps")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML file, apply ``key.sub=value`` overrides, and build a validated config.

    Args:
        path: YAML file whose top-level keys are the sections of ``ExperimentConfig``;
            None starts from the defaults.
        overrides: strings ``section.key=value``; the value is parsed as YAML
            (``train.max_steps=20``, ``model.bert_config={hidden_size: 32}``).

    Returns:
        The validated ``ExperimentConfig``.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or invalid value.
    """
    return from_dict(ExperimentConfig, read_yaml_sections(path, overrides), prefix="")
