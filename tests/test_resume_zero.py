"""Exact resume under DeepSpeed ZeRO-2 and ZeRO-3 (2 CPU processes, real DeepSpeed engines).

- SIGKILL after the step-8 checkpoint, with a half-written later save and a corrupt one left
  behind, then ``train.resume=auto``: the same losses at steps 9-20 bit for bit, the same final
  weights, the same data position at the next checkpoint (the loader state is a global sample
  count, and the order is a function of it: same count, same samples consumed).
- The ZeRO checkpoint resumed on ONE process without DeepSpeed (converted on the fly) with the
  same global batch: the run continues on the uninterrupted run's trajectory (weights, Adam
  moments, schedule and data position all carried over) and reaches max_steps.
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
from dist_harness import free_port
from dist_launch import ACCELERATE

STEPS = 20
STEP8, STEP16 = "step_00000008", "step_00000016"


def _args(shard_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), f"data.train_manifest={shard_dir}", f"train.output_dir={out}",
            f"train.max_steps={STEPS}", "train.log_every_steps=1", "train.progress_bar=false",
            "checkpoint.every_steps=8", *extra]


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


def test_sigkill_then_resume_is_bitwise_identical(reference, shard_dir, tmp_path):
    from dist_harness import kill_tree

    config, ref = reference
    out = tmp_path / "run"
    cmd, env = _cmd(config, _args(shard_dir, out))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / STEP8).is_dir():
            assert proc.poll() is None, "the run ended before its step-8 checkpoint"
            assert time.monotonic() < deadline, "no step-8 checkpoint in time"
            time.sleep(0.05)
    finally:
        kill_tree(proc, timeout=30)
    root = out / "checkpoints"
    assert not (out / "final").exists() and not (root / STEP16).exists()
    # What a kill in the middle of the step-16 save leaves (shards written, no marker), and a
    # complete-looking step-16 checkpoint whose shard got corrupted: both must be passed over.
    shutil.copytree(ref / "checkpoints" / STEP16, root / f".tmp-{STEP16}")
    (root / f".tmp-{STEP16}" / "COMPLETE").unlink()
    shutil.copytree(ref / "checkpoints" / STEP16, root / STEP16)
    shard = sorted((root / STEP16 / "pytorch_model").glob("*optim_states.pt"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])

    result = _run(config, _args(shard_dir, out))
    assert f"resumed from {root / STEP8} at step 8" in result.stdout
    assert "checksum mismatch" in result.stderr or "size mismatch" in result.stderr
    expected, got = _losses(ref), _losses(out)
    assert [got[s] for s in range(9, STEPS + 1)] == [expected[s] for s in range(9, STEPS + 1)]
    ref_w, got_w = _weights(ref), _weights(out)
    assert ref_w.keys() == got_w.keys()
    assert all(bool((ref_w[k] == got_w[k]).all()) for k in ref_w)
    # Same data position at step 16 (global sample count, epoch, order fingerprint).
    assert _trainer_state(root / STEP16)["loader"] == _trainer_state(ref / "checkpoints" / STEP16)["loader"]
    assert not (root / f".tmp-{STEP16}").exists()


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


def test_ckpt_convert_writes_weights_and_every_optimizer_state(reference, tmp_path):
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from clicktower.launcher.checkpoint import check_checkpoint

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
