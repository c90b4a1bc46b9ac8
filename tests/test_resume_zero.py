"""Exact resume under DeepSpeed ZeRO-2 and ZeRO-3 (2 CPU processes, real DeepSpeed engines).

- SIGKILL in the middle of the step-16 save (every rank's ZeRO shards written, no marker yet),
  with a corrupt complete-looking step-16 checkpoint planted beside it, then
  ``train.resume=auto``: it takes step 8 without an error and gives the same losses at steps
  9-20 bit for bit, the same final weights, and the same sample keys on every rank at every
  step (the trainer's ``train.sample_keys_log``), each key once.
- The ZeRO checkpoint resumed on ONE process without DeepSpeed (converted on the fly) with the
  same global batch: the run continues on the uninterrupted run's trajectory (weights, Adam
  moments, schedule and data position all carried over), trains on the same global batches
  and reaches max_steps.
- ``clicktower ckpt convert``: consolidated weights and every parameter's optimiser state.

DeepSpeed on the CPU: DS_ACCELERATOR=cpu and no ACCELERATE_USE_CPU (the trainer names gloo).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_CONFIG, cli_env, clicktower
from dist_harness import assert_exactly_once, consumed_keys, free_port, keys_per_step, logged_steps
from dist_launch import ACCELERATE
from hold_save.sitecustomize import hold_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 20
STEP8, STEP16 = "step_00000008", "step_00000016"


def _args(shard_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), f"data.train_manifest={shard_dir}", f"train.output_dir={out}",
            f"train.max_steps={STEPS}", "train.log_every_steps=1", "train.progress_bar=false",
            "checkpoint.every_steps=8", "train.sample_keys_log=true", *extra]


def _cmd(config: str, args: list[str]) -> tuple[list[str], dict[str, str]]:
    env = {**cli_env(), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    if "zero" in config:
        # ACCELERATE_USE_CPU=true would make accelerate drop DeepSpeed for plain DDP (MULTI_CPU).
        env.pop("ACCELERATE_USE_CPU", None)
    else:
        env["ACCELERATE_USE_CPU"] = "true"
    entry = ["-m", "clicktower.launcher.train"]
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "configs" / "accelerate" / f"{config}.yaml"),
           "--main_process_port", str(free_port()), *entry, *args]
    return cmd, env


def _run(config: str, args: list[str]) -> subprocess.CompletedProcess:
    cmd, env = _cmd(config, args)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "final" / "query_tower" / "model.safetensors")


def _trainer_state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def reference(request, shard_dir, tmp_path_factory) -> tuple[str, Path]:
    config = f"cpu_2proc_{request.param}"
    out = tmp_path_factory.mktemp(request.param) / "run"
    _run(config, _args(shard_dir, out, "train.resume=none"))
    ckpt = out / "checkpoints" / STEP8
    # Real ZeRO shards, one optimiser partition and one RNG file per rank, the topology recorded.
    assert len(list((ckpt / "pytorch_model").glob("*optim_states.pt"))) == 2
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    stage = int(request.param[-1])
    assert _trainer_state(ckpt)["topology"] == {"world_size": 2, "zero_stage": stage}
    return config, out


def test_sigkill_inside_a_save_then_resume_is_bitwise_identical(reference, shard_dir, tmp_path):
    from dist_harness import kill_tree

    config, ref = reference
    out = tmp_path / "run"
    root = out / "checkpoints"
    torn = root / f".tmp-{STEP16}"
    cmd, env = _cmd(config, _args(shard_dir, out))
    # tests/support/hold_save (on the launch's PYTHONPATH) holds the step-16 save after every
    # rank wrote its shards, before the marker.
    proc = subprocess.Popen(cmd, cwd=REPO, env=hold_env(16, env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (torn / "trainer_state.json").is_file():
            assert proc.poll() is None, "the run ended before its step-16 save"
            assert time.monotonic() < deadline, "no step-16 save in time"
            time.sleep(0.05)
    finally:
        kill_tree(proc, timeout=30)
    # A real torn save: both ranks' ZeRO shards of step 16, no marker, never renamed.
    assert len(list((torn / "pytorch_model").glob("*optim_states.pt"))) == 2
    assert not (torn / "COMPLETE").exists() and (root / "latest").read_text().strip() == STEP8
    assert not (out / "final").exists() and not (root / STEP16).exists()
    # Beside it, a complete-looking step-16 checkpoint whose shard got corrupted: passed over too.
    shutil.copytree(ref / "checkpoints" / STEP16, root / STEP16)
    shard = sorted((root / STEP16 / "pytorch_model").glob("*optim_states.pt"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])

    result = _run(config, _args(shard_dir, out))
    assert f"resumed from {root / STEP8} at step 8" in result.stdout
    assert "checksum mismatch" in result.stderr or "size mismatch" in result.stderr
    assert f"skipping checkpoint {torn}: incomplete" in result.stderr
    expected, got = _losses(ref), _losses(out)
    assert [got[s] for s in range(9, STEPS + 1)] == [expected[s] for s in range(9, STEPS + 1)]
    ref_w, got_w = _weights(ref), _weights(out)
    assert ref_w.keys() == got_w.keys()
    assert all(bool((ref_w[k] == got_w[k]).all()) for k in ref_w)
    # Same data position at step 16 (global sample count, epoch, order fingerprint).
    assert _trainer_state(root / STEP16)["loader"] == _trainer_state(ref / "checkpoints" / STEP16)["loader"]
    assert not torn.exists()
    # Each rank logged steps 1-16 before the kill, then 9-20 after the resume: nothing skipped,
    # and the same keys on every rank at every step as the uninterrupted run, each key once.
    assert {rank: [s for s, _, _ in steps] for rank, steps in logged_steps(out).items()} == \
        {rank: list(range(1, 17)) + list(range(9, STEPS + 1)) for rank in (0, 1)}
    keys = consumed_keys(out)
    assert keys == consumed_keys(ref)
    assert_exactly_once(keys, STEPS, 2 * 16)


def test_zero_checkpoint_resumes_on_one_process(reference, shard_dir, tmp_path):
    _, ref = reference
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / STEP8, out / "checkpoints" / STEP8)
    # One process, 32 pairs per step: the global batch of the 2 x 16 run.
    result = _run("cpu_1proc", _args(shard_dir, out, "train.batch_size=32"))
    assert "resumed from" in result.stdout and "converting" in result.stderr
    expected, got = _losses(ref), _losses(out)
    assert sorted(got) == list(range(9, STEPS + 1))
    # Different reduction order (1 rank vs 2 ZeRO partitions): close, not bitwise.
    assert [got[s] for s in range(9, STEPS + 1)] == pytest.approx([expected[s] for s in range(9, STEPS + 1)],
                                                                  abs=1e-3)
    assert got[STEPS] < got[9]
    ref_state, state = _trainer_state(ref / "checkpoints" / STEP16), _trainer_state(out / "checkpoints" / STEP16)
    assert state["loader"] == ref_state["loader"] and state["loader"]["samples_consumed"] == 16 * 32
    assert state["topology"] == {"world_size": 1, "zero_stage": 0}
    # One rank now takes the global batch the two ranks took: the same keys at every step.
    expected_keys = keys_per_step(consumed_keys(ref))
    assert keys_per_step(consumed_keys(out)) == {s: expected_keys[s] for s in range(9, STEPS + 1)}


def test_ckpt_convert_writes_weights_and_every_optimizer_state(reference, tmp_path):
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from clicktower.launcher.engine.checkpoint_files import check_checkpoint

    _, ref = reference
    src, dst = ref / "checkpoints" / STEP8, tmp_path / "converted"
    result = clicktower("ckpt", "convert", str(src), "--out", str(dst))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["step"] == 8 and summary["world_size"] == 2
    assert check_checkpoint(dst) is None and not (dst / "pytorch_model").exists()
    weights, fp32 = load_file(dst / "model.safetensors"), get_fp32_state_dict_from_zero_checkpoint(
        str(src), tag="pytorch_model")
    for name, tensor in weights.items():  # shared towers: safetensors keeps one name per tensor
        name = name if name in fp32 else name.replace("item_tower.", "query_tower.", 1)
        assert torch.equal(tensor.flatten(), fp32[name].contiguous().flatten()), name
    optim = torch.load(dst / "optimizer.bin", weights_only=True)
    params = [i for group in optim["param_groups"] for i in group["params"]]
    assert sorted(optim["state"]) == sorted(params)
    assert all(float(s["step"]) == 8 and s["exp_avg_sq"].abs().sum() > 0 for s in optim["state"].values())
    assert _trainer_state(dst)["topology"]["converted_from"]["zero_stage"] == summary["zero_stage"]
    again = clicktower("ckpt", "convert", str(dst), "--out", str(tmp_path / "twice"))
    assert again.returncode == 2 and "not a DeepSpeed checkpoint" in again.stderr
