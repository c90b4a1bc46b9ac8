"""Run lineages: pruning by commit order within a run, ``latest`` always naming a checkpoint,
``train.resume=none`` refused in a used folder, ``new`` kept apart, ``auto`` never taking
another run's checkpoint, and legacy checkpoints (no lineage record) still resumed."""
from __future__ import annotations

import json
import logging

import pytest

from clicktower.launcher.engine.checkpoint import COMPLETE, LATEST, CheckpointConfig, Checkpointer
from clicktower.launcher.engine.checkpoint import find_resume_checkpoint, list_checkpoints
from clicktower.launcher.engine.checkpoint.files import write_complete_marker
from clicktower.launcher.errors import ConfigError

from conftest import TINY_CONFIG, clicktower
from test_checkpoint import _setup, _step

def _names(out):
    return [p.name for p in list_checkpoints(out)]


def _latest(out):
    """The name ``latest`` holds; it must be a complete checkpoint."""
    name = (out / "checkpoints" / LATEST).read_text().strip()
    assert (out / "checkpoints" / name / COMPLETE).is_file(), f"latest names {name}, which is not there"
    return name


def _run(acc, out, steps, resume, keep_last=2):
    """A run in ``out``: resume per ``resume``, then save each of ``steps``; returns its
    checkpointer. ``latest`` names an existing checkpoint after every save."""
    ckpt = Checkpointer(acc, out, CheckpointConfig(keep_last=keep_last), "train: {}\n")
    ckpt.resume(resume)
    for step in steps:
        ckpt.save(step, {"loader": {}})
        assert _latest(out) == f"step_{step:08d}"
    return ckpt


@pytest.mark.unit
def test_resume_none_in_a_used_folder_refuses_and_new_keeps_the_runs_apart(tmp_path, caplog, capsys):
    """(i) Another run's higher-numbered checkpoints: ``none`` refuses with one line; ``new``
    starts a new lineage whose checkpoints survive pruning, leaving the old run's alone."""
    acc, *_ = _setup(tmp_path / "unused")
    _run(acc, tmp_path, (16, 24), "auto")
    with pytest.raises(ConfigError, match=r"^train.resume=none: .*checkpoints holds checkpoints of an earlier run "
                                          r"\(newest: step_00000024\); .*train.resume=new") as refused:
        _run(acc, tmp_path, (4,), "none")
    assert "\n" not in str(refused.value)
    assert _names(tmp_path) == ["step_00000016", "step_00000024"]

    _run(acc, tmp_path, (4, 8, 12), "new")
    assert "train.resume=new: new run lineage" in capsys.readouterr().out
    assert _names(tmp_path) == ["step_00000008", "step_00000012", "step_00000016", "step_00000024"]
    # (iii) auto continues the run latest names, and names the other run's checkpoints.
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(tmp_path, "auto").name == "step_00000012"
    assert "not resuming 2 checkpoint(s) of another run" in caplog.text and "step_00000024" in caplog.text
    assert Checkpointer(acc, tmp_path, CheckpointConfig(), "").resume("auto")["step"] == 12


@pytest.mark.unit
def test_auto_refuses_to_guess_between_runs_without_latest(tmp_path):
    """(iii) Two lineages and no ``latest`` pointer: one line, never the higher step."""
    acc, *_ = _setup(tmp_path / "unused")
    _run(acc, tmp_path, (16, 24), "auto")
    _run(acc, tmp_path, (4,), "new")
    (tmp_path / "checkpoints" / LATEST).unlink()
    with pytest.raises(ConfigError, match=r"^train.resume=auto: .* holds checkpoints of 2 runs .*no latest pointer"):
        Checkpointer(acc, tmp_path, CheckpointConfig(), "").resume("auto")


@pytest.mark.unit
def test_resume_from_an_earlier_step_prunes_by_commit_order(tmp_path, capsys, caplog):
    """(ii) ``train.resume=DIR`` of step 8 while steps 16 and 24 exist: the new commits are
    kept (the one just saved never pruned), ``auto`` never goes back to 16 or 24."""
    acc, *_ = _setup(tmp_path / "unused")
    _run(acc, tmp_path, (8, 16, 24), "auto", keep_last=3)
    root = tmp_path / "checkpoints"
    ckpt = Checkpointer(acc, tmp_path, CheckpointConfig(keep_last=2), "train: {}\n")
    assert ckpt.resume(str(root / "step_00000008"))["step"] == 8
    assert "going back to commit 1" in capsys.readouterr().out
    # Killed before its first save: auto continues from step 8, not from the left step 24.
    assert _latest(tmp_path) == "step_00000008"
    assert find_resume_checkpoint(tmp_path, "auto").name == "step_00000008"
    # The commits it left are recorded at once (what a node reading the bucket needs too).
    assert json.loads((root / "abandoned.json").read_text()) == {ckpt.lineage_id: [[1, 3]]}
    with caplog.at_level(logging.WARNING):
        ckpt.save(12, {"loader": {}})
    assert _latest(tmp_path) == "step_00000012"
    assert _names(tmp_path) == ["step_00000008", "step_00000012"]  # 16 and 24: left by the resume
    assert "step_00000024: abandoned by a resume" in caplog.text
    ckpt.save(20, {"loader": {}})
    assert _names(tmp_path) == ["step_00000012", "step_00000020"] and _latest(tmp_path) == "step_00000020"
    commits = [json.loads((root / n / "trainer_state.json").read_text())["lineage"] for n in _names(tmp_path)]
    assert [(c["commit"], c["parent"]) for c in commits] == [(4, 1), (5, 4)]
    assert len({c["id"] for c in commits}) == 1


@pytest.mark.unit
def test_a_kill_between_the_rename_and_latest_loses_no_checkpoint(tmp_path):
    """A save renamed into place whose ``latest`` write was cut off is resumed (the pointer
    picks the run, the newest commit of it that no resume went back from is the one taken);
    after a go-back the commits left stay out, even when the pointer still names one of them."""
    acc, *_ = _setup(tmp_path / "unused")
    _run(acc, tmp_path, (4, 8), "auto")
    root = tmp_path / "checkpoints"
    (root / LATEST).write_text("step_00000004\n")  # the kill: step 8 renamed, the pointer not written
    assert find_resume_checkpoint(tmp_path, "auto").name == "step_00000008"
    # A go-back to step 4 leaves commit 2 (step 8); a pointer naming step 8 (written by hand, or
    # an older version's) no longer brings it back.
    ckpt = Checkpointer(acc, tmp_path, CheckpointConfig(keep_last=2), "train: {}\n")
    assert ckpt.resume(str(root / "step_00000004"))["step"] == 4
    (root / LATEST).write_text("step_00000008\n")
    assert find_resume_checkpoint(tmp_path, "auto").name == "step_00000004"
    ckpt.save(6, {"loader": {}})  # commit 3, parent 1; the kill again before its pointer
    (root / LATEST).write_text("step_00000004\n")
    assert find_resume_checkpoint(tmp_path, "auto").name == "step_00000006"


@pytest.mark.unit
def test_checkpoints_without_a_lineage_resume_as_the_legacy_lineage(tmp_path):
    """Checkpoints of earlier versions (no ``lineage`` record) resume as before and are
    pruned by step with the new commits that follow them."""
    acc, model, optimizer, scheduler, ckpt = _setup(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        _step(model, optimizer, scheduler)
        ckpt.save(step, {"loader": {}})
    for name in _names(tmp_path):
        folder = tmp_path / "checkpoints" / name
        state = json.loads((folder / "trainer_state.json").read_text())
        del state["lineage"]
        (folder / "trainer_state.json").write_text(json.dumps(state))
        (folder / COMPLETE).unlink()
        write_complete_marker(folder, int(name[5:]))
    resumed = _run(acc, tmp_path, (4,), "auto")
    assert resumed.lineage_id == "legacy" and _names(tmp_path) == ["step_00000003", "step_00000004"]


@pytest.mark.e2e
def test_cli_refuses_resume_none_in_a_used_folder_with_one_line(shard_dir, tmp_path):
    planted = tmp_path / "run" / "checkpoints" / "step_00000024"
    planted.mkdir(parents=True)
    (planted / COMPLETE).write_text("{}")
    result = clicktower("train", "--config", str(TINY_CONFIG), f"data.train_manifest={shard_dir}",
                        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.progress_bar=false",
                        "train.resume=none")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("clicktower: error: train.resume=none: ") and "train.resume=new" in lines[-1]
    assert "Traceback" not in result.stderr
