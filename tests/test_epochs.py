"""``train.epochs``: the keys it excludes, the steps planned from the data position on any
world size, and the LR schedule by pairs read (issue 26; end to end: test_resume_world.py)."""
from __future__ import annotations

import pytest
import torch

from clicktower.data.loader import ClickPairLoader, DataConfig, Rank
from clicktower.launcher.engine.config import load_config
from clicktower.launcher.engine.loop import DEFAULT_MAX_STEPS, TrainConfig, planned_steps
from clicktower.launcher.engine.optim import OptimConfig, PairsLR, build_scheduler, lr_multiplier
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


def _loader(shards, world: int, state: dict | None = None, rank: int = 0):
    loader = ClickPairLoader(DataConfig(num_workers=0), str(shards), 16, Rank(rank, world), 0)
    if state is not None:
        loader.load_state_dict(state)
    return loader


def test_planned_steps_follow_the_data_position_on_any_world_size(epoch_shard_dir):
    """train.epochs=2 on 320 pairs, 16 a process: 20 steps at 2 processes, 40 at one; a
    checkpoint taken at the end of epoch 0 or in its middle leaves epoch 1 (and the rest of
    epoch 0) at the new world size's global batch, k micro-batches a step."""
    cfg = TrainConfig(epochs=2)
    assert planned_steps(cfg, 0, _loader(epoch_shard_dir, 2), 1) == 20
    assert planned_steps(cfg, 0, _loader(epoch_shard_dir, 1), 1) == 40
    assert planned_steps(cfg, 0, _loader(epoch_shard_dir, 1), 3) == 13   # 40 micro-batches, 1 left over
    two_ranks_epoch_0 = {"epoch": 0, "samples_consumed": 320, "segments": [[2, 16, 160]]}
    assert planned_steps(cfg, 10, _loader(epoch_shard_dir, 1, two_ranks_epoch_0), 1) == 10 + 20
    assert planned_steps(cfg, 10, _loader(epoch_shard_dir, 1, two_ranks_epoch_0), 4) == 10 + 5
    one_rank_epoch_0 = {"epoch": 0, "samples_consumed": 320, "segments": [[1, 16, 320]]}
    for rank in (0, 1):   # before: max_steps 20 <= the restored step 20, so the run stopped
        assert planned_steps(cfg, 20, _loader(epoch_shard_dir, 2, one_rank_epoch_0, rank), 1) == 20 + 10
    half = {"epoch": 0, "samples_consumed": 160, "segments": [[2, 16, 80]]}   # 5 steps of 2 x 16
    assert planned_steps(cfg, 5, _loader(epoch_shard_dir, 1, half), 1) == 5 + 10 + 20
    done = {"epoch": 2, "samples_consumed": 0, "segments": []}
    assert planned_steps(cfg, 30, _loader(epoch_shard_dir, 1, done), 1) == 30
    assert planned_steps(TrainConfig(max_steps=7), 3, None, 1) == 7


OPTIM = OptimConfig(lr=3e-3, warmup_steps=2, schedule="linear")   # configs/tiny.yaml's


def _scheduler(pairs_per_step: int, max_steps: int) -> PairsLR:
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=3e-3)
    return build_scheduler(optimizer, OPTIM, max_steps, pairs_per_step)


def _lrs(scheduler: PairsLR, steps: int) -> list[float]:
    """The learning rate after each of ``steps`` more steps (what metrics.jsonl logs)."""
    out = []
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        out.append(scheduler.get_last_lr()[0])
    return out



def test_the_lr_schedule_counts_pairs_across_a_world_size_change():
    """Issue 26's example: 2 x 16 pairs a step, epochs=2 on 320 pairs (20 steps), checkpointed
    at step 10 and resumed on one process (16 a step, 20 steps left). The resumed run's LR at
    every pair count is the uninterrupted run's; at its step 15 (400 pairs of 640, warmup 64)
    1.25e-3 (it was 1.97e-3: the schedule restarted over 40 steps)."""
    whole = _scheduler(32, 20)
    whole.set_layout(32, 20)
    ref = _lrs(whole, 20)
    assert ref == pytest.approx([3e-3 * lr_multiplier(s, OPTIM, 20) for s in range(1, 21)])   # steps as before

    first = _scheduler(32, 20)
    first.set_layout(32, 20)
    _lrs(first, 10)
    state = first.state_dict()
    resumed = _scheduler(16, 40)   # what a fresh plan at one process builds...
    resumed.load_state_dict(state)
    resumed.set_layout(16, 30)   # ...then the loop sets it from the restored position
    assert resumed.get_last_lr()[0] == pytest.approx(ref[9])
    got = _lrs(resumed, 20)   # steps 11..30
    assert got[1::2] == pytest.approx(ref[10:])   # step 10 + 2j at 320 + 32j pairs: ref step 10 + j
    assert got[15 - 11] == pytest.approx(3e-3 * (1 - (400 - 64) / (640 - 64)))
    assert got[-1] == pytest.approx(0.0)
    assert resumed.state_dict()["position"] == {"step": 10, "pairs": 320, "pairs_per_step": 16,
                                                "total_pairs": 640, "warmup_pairs": 64}
