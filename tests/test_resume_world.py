"""Resume on another world size under DDP: a 2-process checkpoint continued on 1 process and a
1-process checkpoint continued on 2 (ZeRO checkpoints onto 1 process, and ZeRO to ZeRO on
another world size: test_resume_zero.py).

The global batch is kept (1 x 32 <-> 2 x 16), so the resumed run must follow the
uninterrupted run's losses (to float reassociation across ranks) and reach max_steps: weights,
Adam moments, LR schedule and data position all carried over. The data stays exactly-once: the
loader state is a global sample count from which every world size derives the same order
(tests/test_data_properties.py), and it must equal the uninterrupted run's at step 16. The
runs read with test_resume_zero's ``SAME_BATCHES`` settings (in ``_args``), under which every
world size trains on the same global batches.
``train.epochs`` across a world-size change (issue 26): each pair trained once an epoch, the
LR by pairs read.
Per-rank RNG streams cannot carry over to ranks that did not exist (the tiny model has no
dropout, so they do not change these runs).
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from conftest import TINY_CONFIG
from dist_harness import consumed_keys, keys_per_step
from test_resume_zero import STEP8, STEP16, STEPS, _args, _losses, _position, _run, _steps, _trainer_state

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("before,after", [(("cpu_2proc_ddp", 16), ("cpu_1proc", 32)),
                                          (("cpu_1proc", 32), ("cpu_2proc_ddp", 16))],
                         ids=["2to1", "1to2"])
def test_ddp_checkpoint_resumes_on_another_world_size(before, after, shard_dir, tmp_path):
    ref = tmp_path / "ref"
    _run(before[0], _args(shard_dir, ref, "train.resume=none", f"train.batch_size={before[1]}"))
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / STEP8, out / "checkpoints" / STEP8)
    result = _run(after[0], _args(shard_dir, out, f"train.batch_size={after[1]}"))
    assert "resumed from" in result.stdout
    assert "processes, resumed on" in result.stderr  # the RNG caveat is reported
    expected, got = _losses(ref), _losses(out)
    assert _steps(out) == list(range(1, STEPS + 1))
    assert [got[s] for s in range(9, STEPS + 1)] == pytest.approx([expected[s] for s in range(9, STEPS + 1)],
                                                                  abs=1e-4)
    assert got[STEPS] < got[9]
    state, ref_state = _trainer_state(out / "checkpoints" / STEP16), _trainer_state(ref / "checkpoints" / STEP16)
    assert _position(state) == _position(ref_state) == (0, 16 * 32)
    world = 1 if after[0] == "cpu_1proc" else 2
    assert state["topology"] == {"world_size": world, "zero_stage": 0}
    # The other world size trains on the same global batches: the same keys at every step.
    expected_keys = keys_per_step(consumed_keys(ref))
    assert keys_per_step(consumed_keys(out)) == {s: expected_keys[s] for s in range(9, STEPS + 1)}


def test_global_batch_change_keeps_the_data_position(shard_dir, tmp_path):
    """2 x 16 for 8 steps, then 1 x 16: the loader continues at global sample 256 and counts
    16 per step from there (no sample repeated or skipped)."""
    ref = tmp_path / "ref"
    _run("cpu_2proc_ddp", _args(shard_dir, ref, "train.resume=none", "train.max_steps=8"))
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / STEP8, out / "checkpoints" / STEP8)
    _run("cpu_1proc", _args(shard_dir, out, "train.max_steps=16"))
    assert _trainer_state(ref / "checkpoints" / STEP8)["loader"]["samples_consumed"] == 8 * 32
    state = _trainer_state(out / "checkpoints" / STEP16)
    assert state["loader"]["samples_consumed"] == 8 * 32 + 8 * 16
    assert _steps(out) == list(range(1, 17))
    # Steps 1-8 (2 ranks) and 9-16 (1 rank) together: every key at most once.
    keys = [k for record in (consumed_keys(ref), consumed_keys(out)) for _, ks in record.values() for k in ks]
    assert len(keys) == len(set(keys)) == 8 * 32 + 8 * 16


@pytest.mark.parametrize("before,after", [(("cpu_2proc_ddp", 10), ("cpu_1proc", 20)),
                                          (("cpu_1proc", 20), ("cpu_2proc_ddp", 10))],
                         ids=["2to1", "1to2"])
def test_epochs_across_a_world_size_change(before, after, epoch_shard_dir, tmp_path):
    """Issue 26: ``train.epochs=2`` on 320 pairs (16 a process), checkpointed at the end of
    epoch 0 (``before``: config, steps per epoch), resumed on the other world size: every
    pair trained exactly twice (once an epoch), the run ends at the end of epoch 1, and the
    LR follows the schedule by pairs read: at every pair count both runs reach, the
    uninterrupted run's LR. Before, 2 -> 1 trained 2.5 epochs and 1 -> 2 stopped at once."""
    def args(out: Path, *extra: str) -> list[str]:
        return ["--config", str(TINY_CONFIG), f"data.train_manifest={epoch_shard_dir}", f"train.output_dir={out}",
                "train.max_steps=null", "train.epochs=2", "train.log_every_steps=1", "train.progress_bar=false",
                "train.sample_keys_log=true", f"checkpoint.every_steps={before[1]}", *extra]

    ref, out = tmp_path / "ref", tmp_path / "run"
    _run(before[0], args(ref, "train.resume=none"))
    cut = f"step_{before[1]:08d}"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / cut, out / "checkpoints" / cut)
    _run(after[0], args(out))
    lrs = {name: {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
           for name, run in (("ref", ref), ("run", out))}
    assert _steps(out) == list(range(1, before[1] + after[1] + 1))  # 1..cut from the checkpoint's copy
    lrs["run"] = {step: lr for step, lr in lrs["run"].items() if step > before[1]}
    trained = Counter()
    for run, last in ((ref, before[1]), (out, None)):
        for (_, step), (epochs, keys) in consumed_keys(run).items():
            if last is None or step <= last:
                trained.update(zip(keys, epochs))
    assert len({key for key, _ in trained}) == 320
    assert set(trained.values()) == {1} and {epoch for _, epoch in trained} == {0, 1}
    assert len(trained) == 640   # every pair once in each epoch
    # Pairs after step s: before[1] steps of 320 // before[1] pairs, then 320 // after[1] a step.
    per_ref, per_run = 320 // before[1], 320 // after[1]
    for step, lr in lrs["run"].items():
        pairs = 320 + (step - before[1]) * per_run
        if pairs % per_ref == 0:
            assert lr == pytest.approx(lrs["ref"][pairs // per_ref], rel=1e-9, abs=1e-12)
    assert lrs["run"][before[1] + after[1]] == pytest.approx(0.0, abs=1e-12)   # linear to 0 at the end
