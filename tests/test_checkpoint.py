"""Checkpoint component: atomic layout, completion marker, auto resume past broken saves, pruning."""
from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from accelerate import Accelerator

from clicktower.launcher.engine.checkpoint import CheckpointConfig, Checkpointer
from clicktower.launcher.engine.checkpoint import COMPLETE, LATEST, find_resume_checkpoint, list_checkpoints
from clicktower.launcher.engine.optim import OptimConfig, build_optimizer, build_scheduler
from clicktower.modeling.towers import TwoTower, TwoTowerConfig

pytestmark = pytest.mark.unit

TINY = dict(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=32)


def _setup(tmp_path, keep_last=2, cfg=None):
    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    model = TwoTower.from_config(TwoTowerConfig(bert_config=TINY, tokenizer="unused"))
    optim_cfg = OptimConfig(lr=1e-2)
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, 10)
    model, optimizer = acc.prepare(model, optimizer)
    acc.register_for_checkpointing(scheduler)
    cfg = cfg or CheckpointConfig(keep_last=keep_last)
    return acc, model, optimizer, scheduler, Checkpointer(acc, tmp_path, cfg, "train: {}\n")


def _step(model, optimizer, scheduler):
    ids = torch.randint(1, 100, (4, 6))
    mask = torch.ones_like(ids)
    q, i, scale = model(ids, mask, ids, mask)
    (scale * (q - i.roll(1, 0)).pow(2).sum()).backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_save_load_restores_model_optimizer_scheduler_and_rng(tmp_path):
    acc, model, optimizer, scheduler, ckpt = _setup(tmp_path)
    _step(model, optimizer, scheduler)
    folder = ckpt.save(1, {"loader": {"epoch": 0, "samples_consumed": 4}})
    assert folder.name == "step_00000001" and (folder / COMPLETE).is_file()
    assert (tmp_path / "checkpoints" / LATEST).read_text().strip() == "step_00000001"
    expected_rng = torch.rand(3)
    params = [p.detach().clone() for p in model.parameters()]
    _step(model, optimizer, scheduler)
    _step(model, optimizer, scheduler)
    after_two = [p.detach().clone() for p in model.parameters()]

    state = ckpt.load(find_resume_checkpoint(tmp_path, "auto"))
    assert state == {"loader": {"epoch": 0, "samples_consumed": 4}, "step": 1}
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert scheduler.last_epoch == 1
    assert torch.equal(torch.rand(3), expected_rng)  # the RNG continues where it was saved
    # The same two steps (same random batches, same optimiser state) give the same bits.
    _step(model, optimizer, scheduler)
    _step(model, optimizer, scheduler)
    assert all(torch.equal(a, b) for a, b in zip(after_two, model.parameters()))


def test_auto_resume_skips_incomplete_and_corrupt_checkpoints(tmp_path, caplog):
    acc, model, optimizer, scheduler, ckpt = _setup(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        _step(model, optimizer, scheduler)
        ckpt.save(step, {"loader": {}})
    root = tmp_path / "checkpoints"
    # step 3 corrupt (a flipped byte), step 4 killed before its marker, plus a half-written temp dir.
    weights = root / "step_00000003" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    (root / "step_00000004").mkdir()
    (root / "step_00000004" / "trainer_state.json").write_text("{}")
    (root / ".tmp-step_00000005").mkdir()
    with caplog.at_level(logging.WARNING):
        chosen = find_resume_checkpoint(tmp_path, "auto")
    assert chosen.name == "step_00000002"
    assert "step_00000004: incomplete" in caplog.text and "step_00000003: checksum mismatch" in caplog.text
    assert ".tmp-step_00000005: incomplete" in caplog.text
    assert find_resume_checkpoint(tmp_path, "none") is None
    with pytest.raises(FileNotFoundError, match="not a usable checkpoint"):
        find_resume_checkpoint(tmp_path, str(root / "step_00000004"))


def test_keep_last_prunes_old_checkpoints_and_temp_dirs(tmp_path):
    acc, model, optimizer, scheduler, ckpt = _setup(tmp_path, keep_last=2)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".tmp-step_00000009").mkdir()
    for step in (1, 2, 3, 4):
        ckpt.save(step, {"loader": {}})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    marker = json.loads((tmp_path / "checkpoints" / "step_00000004" / COMPLETE).read_text())
    assert marker["step"] == 4 and "trainer_state.json" in marker["files"]


def test_due_by_steps_and_minutes(tmp_path):
    acc = Accelerator(cpu=True)
    by_steps = Checkpointer(acc, tmp_path, CheckpointConfig(every_steps=4), "")
    assert [s for s in range(1, 13) if by_steps.due(s)] == [4, 8, 12]
    by_time = Checkpointer(acc, tmp_path, CheckpointConfig(every_minutes=1e-9), "")
    assert by_time.due(1)
    assert not Checkpointer(acc, tmp_path, CheckpointConfig(), "").due(5)


def test_marker_takes_the_ranks_digests_and_hashes_only_the_rest(tmp_path, monkeypatch):
    """Rank 0 hashes only files no rank reported; a reported file that is not there fails."""
    from clicktower.launcher.engine.checkpoint import files as checkpoint_files
    from clicktower.launcher.engine.checkpoint.files import HashingFile, check_checkpoint, write_complete_marker

    (tmp_path / "pytorch_model").mkdir()
    with open(tmp_path / "pytorch_model" / "shard_1.pt", "wb") as fh:
        out = HashingFile(fh)
        out.write(b"x" * 5000)
    (tmp_path / "trainer_state.json").write_text("{}")
    hashed = []
    real = checkpoint_files.sha256_file
    monkeypatch.setattr(checkpoint_files, "sha256_file", lambda path, *a: hashed.append(path.name) or real(path, *a))
    write_complete_marker(tmp_path, 3, {"pytorch_model/shard_1.pt": out.record()})
    assert hashed == ["trainer_state.json"]  # the shard's digest came from the rank that wrote it
    monkeypatch.undo()
    assert check_checkpoint(tmp_path) is None  # and it is the file's real sha256
    with pytest.raises(FileNotFoundError, match="not there"):
        write_complete_marker(tmp_path, 3, {"pytorch_model/shard_2.pt": out.record()})


def test_async_save_writes_the_state_of_its_step_in_the_background(tmp_path, monkeypatch):
    """The state is copied at the step boundary: training on while the write is held does not
    leak into the checkpoint; until every write is done nothing is committed (no marker, no
    rename, no ``latest``); then ``poll`` commits it, with the files a synchronous save writes."""
    import threading

    from clicktower.launcher.engine.checkpoint.files import check_checkpoint
    from clicktower.launcher.engine.checkpoint.state import Snapshot

    release, real_write = threading.Event(), Snapshot.write
    monkeypatch.setattr(Snapshot, "write", lambda self: release.wait(60) and real_write(self))
    acc, model, optimizer, scheduler, ckpt = _setup(tmp_path)
    ckpt.cfg.async_save = True
    _step(model, optimizer, scheduler)
    saved_params = [p.detach().clone() for p in model.parameters()]
    folder = ckpt.save(1, {"loader": {}})
    _step(model, optimizer, scheduler)  # the live tensors change while the write waits
    ckpt.poll()
    root = tmp_path / "checkpoints"
    assert not folder.exists() and (root / ".tmp-step_00000001").is_dir() and not (root / LATEST).exists()
    release.set()
    ckpt.pending.join()
    ckpt.poll()
    assert ckpt.last_saved == folder and check_checkpoint(folder) is None
    assert (root / LATEST).read_text().strip() == "step_00000001"
    sync_dir = tmp_path / "sync"
    Checkpointer(acc, sync_dir, CheckpointConfig(), "train: {}\n").save(2, {"loader": {}})
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (sync_dir / "checkpoints" /
                                                                                "step_00000002").iterdir())
    ckpt.load(folder)
    assert all(torch.equal(a, b) for a, b in zip(saved_params, model.parameters()))


def test_checkpoint_config_keys_are_validated():
    from clicktower.launcher.engine.config import load_config
    from clicktower.launcher.errors import ConfigError
    from conftest import TINY_CONFIG

    cfg = load_config(TINY_CONFIG, ["checkpoint.async_save=true", "checkpoint.remote_dir=s3://bucket/runs/x",
                             "checkpoint.storage_options={anon: false}", "checkpoint.remote_retries=2"])
    assert (cfg.checkpoint.async_save, cfg.checkpoint.remote_dir) == (True, "s3://bucket/runs/x")
    assert cfg.checkpoint.storage_options == {"anon": False} and cfg.checkpoint.remote_retries == 2
    for bad, key in (("checkpoint.remote_retries=-1", "remote_retries"), ("checkpoint.remote_dir=' '", "remote_dir"),
                     ("checkpoint.async_save=maybe", "async_save")):
        with pytest.raises(ConfigError, match=key):
            load_config(TINY_CONFIG, [bad])


def test_save_refuses_a_model_with_nan_weights(tmp_path):
    """A NaN model is never written: no folder, no marker, ``latest`` still names the last
    finite checkpoint (issue 26: a NaN step_00000005 was resumed forever)."""
    acc, model, optimizer, scheduler, ckpt = _setup(tmp_path)
    _step(model, optimizer, scheduler)
    ckpt.save(1, {"loader": {}})
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"refusing to checkpoint step 2: 1 model tensor\(s\) hold NaN or inf "
                                                 r"\(e\.g\. .+\); the newest checkpoint stays .*step_00000001"):
        ckpt.save(2, {"loader": {}})
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"] and not list(root.glob(".tmp-*"))
    assert (root / LATEST).read_text().strip() == "step_00000001"


def test_zero3_partition_padding_is_not_counted_as_a_nan_weight():
    """Under ZeRO-3 each rank checks its own partition (``ds_tensor``), and DeepSpeed leaves
    the padding at the end of the last partitions uninitialised (``torch.empty``): a NaN there
    is not the model's (rank 1's whole partition of the 1-element temperature is padding; this
    refused a healthy ZeRO-3 checkpoint once in CI). A NaN among a partition's own elements is."""
    from types import SimpleNamespace

    from clicktower.launcher.engine.checkpoint.state import nonfinite_parameters

    def zero3_param(numel, partition, rank):
        param = torch.nn.Parameter(torch.empty(0))  # ZeRO-3 leaves the full tensor empty
        param.ds_tensor = torch.tensor(partition)
        param.ds_tensor.ds_numel = len(partition)
        param.ds_numel, param.ds_zero_partition_rank = numel, rank
        return param

    nan = float("nan")

    def check(**params):
        model = torch.nn.Module()
        for name, param in params.items():
            model.register_parameter(name, param)
        return nonfinite_parameters(SimpleNamespace(_models=[model]))

    assert check(scale=zero3_param(1, [nan], rank=1)) == []  # all padding
    assert check(weight=zero3_param(5, [1.0, 2.0, nan], rank=1)) == []  # elements 3, 4, then padding
    assert check(weight=zero3_param(5, [1.0, nan, 3.0], rank=1)) == ["weight"]
    assert check(scale=zero3_param(1, [nan], rank=0)) == ["scale"]
    assert check(plain=torch.nn.Parameter(torch.tensor([1.0, nan]))) == ["plain"]


def test_resume_refuses_a_checkpoint_with_nan_weights(tmp_path):
    """A complete checkpoint whose weights hold NaN (as older versions saved after a NaN
    update; here its weights file rewritten and its marker re-hashed) is refused on resume
    with one line naming the folder and what to do."""
    from safetensors.torch import load_file, save_file

    from clicktower.launcher.engine.checkpoint.files import write_complete_marker
    from clicktower.launcher.errors import ConfigError

    acc, model, optimizer, scheduler, ckpt = _setup(tmp_path, keep_last=5)
    for step in (1, 2):
        _step(model, optimizer, scheduler)
        ckpt.save(step, {"loader": {}})
    folder = tmp_path / "checkpoints" / "step_00000002"
    weights = load_file(str(folder / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_complete_marker(folder, 2)
    assert find_resume_checkpoint(tmp_path, "auto") == folder  # complete and checksummed: only the weights tell
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(folder))}: 1 model tensor\(s\) hold NaN or inf .*delete that folder"):
        ckpt.resume("auto")
    assert ckpt.resume(str(tmp_path / "checkpoints" / "step_00000001"))["step"] == 1  # an older one loads
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _metric_steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_metrics_travel_in_the_checkpoint_and_a_resume_keeps_each_step_once(tmp_path):
    """metrics.jsonl is copied into every checkpoint; a resume puts it back up to the resumed
    step: the stopped run's later records go (they are trained again), and a run folder
    without the file (a fresh disk, the checkpoint downloaded) gets the steps before."""
    from clicktower.launcher.engine.metrics import MetricsLog

    acc, model, optimizer, scheduler, _ = _setup(tmp_path)
    metrics = MetricsLog(tmp_path / "metrics.jsonl", True)
    ckpt = Checkpointer(acc, tmp_path, CheckpointConfig(keep_last=2), "train: {}\n", metrics)
    for step in range(1, 7):
        _step(model, optimizer, scheduler)
        metrics.write({"step": step, "loss": 1.0 / step})
        if step == 4:
            folder = ckpt.save(step, {"loader": {}})
    assert _metric_steps(folder / "metrics.jsonl") == [1, 2, 3, 4]
    assert _metric_steps(metrics.path) == [1, 2, 3, 4, 5, 6]

    fresh = Checkpointer(acc, tmp_path, CheckpointConfig(keep_last=2), "train: {}\n", metrics)
    assert fresh.resume("auto")["step"] == 4
    assert _metric_steps(metrics.path) == [1, 2, 3, 4]  # steps 5 and 6 are replayed: not twice

    metrics.path.unlink()  # an empty disk but for the checkpoint
    Checkpointer(acc, tmp_path, CheckpointConfig(keep_last=2), "train: {}\n", metrics).resume("auto")
    assert _metric_steps(metrics.path) == [1, 2, 3, 4]


def test_metrics_resume_without_a_saved_copy_truncates_the_runs_own_file(tmp_path):
    """A checkpoint of an earlier version holds no metrics.jsonl: the run's own file is cut at
    the resumed step (a torn last line goes too)."""
    from clicktower.launcher.engine.metrics import MetricsLog

    metrics = MetricsLog(tmp_path / "metrics.jsonl", True)
    for step in (2, 4, 6, 8):
        metrics.write({"step": step, "loss": 0.5})
    with metrics.path.open("a") as fh:
        fh.write('{"step": 1')  # killed mid-line
    metrics.resume(4, tmp_path / "checkpoints" / "step_00000004" / "metrics.jsonl")
    assert _metric_steps(metrics.path) == [2, 4]
    MetricsLog(tmp_path / "metrics.jsonl", False).resume(2, None)  # other ranks: untouched
    assert _metric_steps(metrics.path) == [2, 4]
