"""Checkpoint component: atomic layout, completion marker, auto resume past broken saves, pruning."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from accelerate import Accelerator

from clicktower.launcher.engine.checkpoint import CheckpointConfig, Checkpointer
from clicktower.launcher.engine.checkpoint_files import COMPLETE, LATEST, find_resume_checkpoint, list_checkpoints
from clicktower.launcher.engine.optim import OptimConfig, build_optimizer, build_scheduler
from clicktower.modeling.towers import TwoTower, TwoTowerConfig

pytestmark = pytest.mark.unit

TINY = dict(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=32)


def _setup(tmp_path, keep_last=2):
    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    model = TwoTower.from_config(TwoTowerConfig(bert_config=TINY, tokenizer="unused"))
    optim_cfg = OptimConfig(lr=1e-2)
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, 10)
    model, optimizer = acc.prepare(model, optimizer)
    acc.register_for_checkpointing(scheduler)
    return acc, model, optimizer, scheduler, Checkpointer(acc, tmp_path, CheckpointConfig(keep_last=keep_last), "train: {}\n")


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
