"""Experiment trackers: train.report_to through accelerate, TensorBoard read back from its
event files, W&B in offline mode, and a resumed run continuing the same tracker run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from clicktower.launcher.engine.tracking import TRAIN_SCALARS, flat_config, tracker_names
from clicktower.launcher.errors import ConfigError

from conftest import TINY_CONFIG, clicktower


@pytest.mark.unit
def test_report_to_takes_a_name_or_a_list_and_names_what_is_wrong():
    assert tracker_names(None) == [] and tracker_names([]) == []
    assert tracker_names("tensorboard") == ["tensorboard"]
    assert tracker_names(["tensorboard", "wandb"]) == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'"):
        tracker_names("tensorbord")


@pytest.mark.unit
def test_missing_tracker_package_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.report_to=wandb: the wandb package is not installed"):
        tracker_names(["tensorboard", "wandb"])


@pytest.mark.unit
def test_flat_config_gives_scalar_hparams():
    flat = flat_config({"train": {"seed": 0, "report_to": ["tensorboard"]}, "model": {"bert_config": None}})
    assert flat == {"train.seed": 0, "train.report_to": "['tensorboard']", "model.bert_config": "None"}


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the TensorBoard event files under ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(set(points)) for tag, points in series.items()}


@pytest.mark.e2e
def test_tensorboard_and_wandb_through_a_resume(shard_dir, tmp_path):
    """6 steps in two runs (stop after a step-4 checkpoint, then resume): one TensorBoard run
    with every train/ scalar at steps 1..6, one W&B offline run whose id the checkpoint kept,
    and metrics.jsonl with its usual keys."""
    out = tmp_path / "run"
    args = ["train", "--config", str(TINY_CONFIG), f"data.train_manifest={shard_dir}", f"train.output_dir={out}",
            "train.log_every_steps=1", "train.progress_bar=false", "checkpoint.every_steps=2",
            "train.report_to=[tensorboard, wandb]"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    first = clicktower(*args, "train.max_steps=4", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads((out / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    run = state["observers"]["metrics"]["tracker"]
    assert run["name"] == "run" and len(run["id"]) == 16
    second = clicktower(*args, "train.max_steps=6", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr

    scalars = _scalars(out / "tensorboard")
    for name in TRAIN_SCALARS.values():
        assert [step for step, _ in scalars[name]] == [1, 2, 3, 4, 5, 6], name
    runs = {p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")}
    assert {p.relative_to(out / "tensorboard").parts[0] for p in runs} == {"run"}  # one run, continued
    losses = {json.loads(line)["step"]: json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert [round(v, 5) for _, v in scalars["train/loss"]] == [round(losses[s], 5) for s in range(1, 7)]
    first_line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert set(first_line) >= {"step", "epoch", "loss", "lr", "temperature", "logit_scale", "pairs_per_sec"}
    assert not set(first_line) & {"step_time_s", "data_wait_s"}  # metrics.jsonl keys unchanged

    wandb_runs = sorted((out / "wandb").glob("offline-run-*"))
    assert wandb_runs and all(p.name.endswith(run["id"]) for p in wandb_runs), wandb_runs
