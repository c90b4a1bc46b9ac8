"""Experiment trackers (TensorBoard, Weights & Biases, anything accelerate supports) for a run.

``train.report_to`` names them; they go through accelerate (``Accelerator(log_with=...)``,
``init_trackers`` with the resolved config, ``accelerator.log``), on the main process only.
A resumed run continues the same tracker run: the run's name and W&B id are part of the
checkpoint (``Tracker.state_dict``), so a requeued job appends to the curves it left.

Scalars, each at the optimiser step: ``train/loss``, ``train/lr``, ``train/temperature``,
``train/pairs_per_sec``, ``train/step_time_s``, ``train/data_wait_s`` (means over the
``train.log_every_steps`` window, like ``metrics.jsonl``), the loader's ``data_*`` counters
and the ``eval/*`` metrics. TensorBoard writes under ``OUTPUT_DIR/tensorboard/``.
"""
from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path
from typing import Any

from clicktower.launcher.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"

# metrics.jsonl key -> tracker scalar name (the loader's data_* counters keep their names).
TRAIN_SCALARS = {"loss": "train/loss", "lr": "train/lr", "temperature": "train/temperature",
                 "pairs_per_sec": "train/pairs_per_sec", "step_time_s": "train/step_time_s",
                 "data_wait_s": "train/data_wait_s"}

# Tracker name -> the module it needs (what accelerate imports for it).
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "aim": "aim",
            "mlflow": "mlflow", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
            "trackio": "trackio"}


def tracker_names(report_to: str | list[str] | None) -> list[str]:
    """``train.report_to`` as a list of tracker names, each checked to be installed.

    Args:
        report_to: a tracker name, a list of them, or None / [] for none.

    Raises:
        ConfigError: an unknown tracker, or one whose package is not installed.
    """
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name not in _MODULES:
            raise ConfigError(f"train.report_to: unknown tracker {name!r} (choose from {', '.join(_MODULES)})")
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise ConfigError(f"train.report_to={name}: the {_MODULES[name]} package is not installed "
                              f"(pip install {_MODULES[name]})")
    return names


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"seed": 0}}`` -> ``{"train.seed": 0}``; lists and None as text (what
    TensorBoard's hparams and every tracker accept).

    Args:
        config: the nested resolved config.
        prefix: key prefix of this level.
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


class Tracker:
    """The run's trackers, or nothing when ``train.report_to`` is empty.

    Args:
        accelerator: built with ``log_with`` = the tracker names and ``project_dir`` = the run
            folder (see ``accelerator_tracking_kwargs``).
        project: the tracker project name (the run folder's name).
        config: the resolved experiment config (nested dict), stored with the run.
    """

    def __init__(self, accelerator: Any, project: str, config: dict[str, Any]) -> None:
        self.accelerator, self.project, self.config = accelerator, project, config
        self.enabled = bool(accelerator.log_with)
        self.run: dict[str, str] = {}

    def start(self, saved: dict[str, str] | None) -> None:
        """Start the trackers: a new run, or the run a checkpoint names (collective-free).

        Args:
            saved: ``state_dict()`` of the run being resumed, or None for a fresh run.
        """
        if not self.enabled:
            return
        # The same name and id after a resume: TensorBoard appends to the run's folder, W&B
        # resumes the run with that id.
        self.run = dict(saved) if saved else {"name": self.project, "id": uuid.uuid4().hex[:16]}
        init_kwargs = {"wandb": {"id": self.run["id"], "resume": "allow", "name": self.run["name"],
                                 "dir": str(self.accelerator.project_dir)}}
        self.accelerator.init_trackers(self.run["name"], config=flat_config(self.config),
                                       init_kwargs=init_kwargs)

    def log(self, values: dict[str, float], step: int) -> None:
        """Log scalars at an optimiser step (main process only; a no-op without trackers).

        Args:
            values: scalar name -> value.
            step: the optimiser step.
        """
        if self.enabled:
            self.accelerator.log(values, step=step)

    def log_train(self, record: dict[str, Any], timings: dict[str, float]) -> None:
        """Log one ``metrics.jsonl`` training record under the tracker names.

        Args:
            record: the metrics line (``step``, ``loss``, ``lr``, ``data_*`` ...).
            timings: ``step_time_s`` and ``data_wait_s``, means over the window.
        """
        values = {**record, **timings}
        scalars = {name: float(values[key]) for key, name in TRAIN_SCALARS.items() if key in values}
        scalars.update({k: float(v) for k, v in record.items() if k.startswith("data_")})
        self.log(scalars, record["step"])

    def log_eval(self, record: dict[str, Any]) -> None:
        """Log an evaluation record's ``eval/*`` metrics.

        Args:
            record: the periodic-eval metrics line (``step``, ``eval/...``).
        """
        self.log({k: float(v) for k, v in record.items() if k.startswith("eval/")}, record["step"])

    def state_dict(self) -> dict[str, str]:
        """The run's name and id, saved with every checkpoint."""
        return dict(self.run)


def accelerator_tracking_kwargs(report_to: str | list[str] | None, output_dir: str | Path) -> dict[str, Any]:
    """``Accelerator`` arguments for ``train.report_to``: ``log_with`` and where TensorBoard writes.

    Args:
        report_to: ``train.report_to``.
        output_dir: the run folder.
    """
    names = tracker_names(report_to)
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    out = Path(output_dir)
    return {"log_with": names,
            "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / TENSORBOARD_DIR))}
