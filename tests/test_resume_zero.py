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
- ZeRO to ZeRO on another world size (2 -> 1 for ZeRO-2 and ZeRO-3, 1 -> 2 for ZeRO-2, the
  global batch kept): converted through DeepSpeed's universal checkpoint when the resume
  finds the mismatch, or offline (``ckpt convert --to universal``, then ``train.resume=`` the
  output; ZeRO-2, 2 -> 1 and 1 -> 2); the losses stay within 1e-5 of the run that never
  changed size, on the same global batches, each sample once.
- ``checkpoint.async_save`` (ZeRO-2): SIGKILL while the step-16 write is held in its
  background thread, after training went on to the end: step 8 stays the latest, the resume
  is bitwise identical, verification ran in one process of the node, and the async
  checkpoints load through ``zero_to_fp32`` and the universal conversion like synchronous ones.

Every run reads with ``data.block_size=1 data.interleave_shards=1 data.shuffle_buffer=1``:
blocks of one sample dealt round-robin and shuffle windows of one batch make the global batch
at every step the same set of samples on any world size (the default block and window sizes
give every world size its own, equally exactly-once, order), so that runs of different sizes
can be compared step by step.

DeepSpeed on the CPU: DS_ACCELERATOR=cpu and no ACCELERATE_USE_CPU (the trainer names gloo).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from clicktower.launcher.engine.checkpoint.files import write_complete_marker

from conftest import REPO, TINY_CONFIG, cli_env, clicktower, run
from dist_harness import assert_exactly_once, consumed_keys, free_port, keys_per_step, logged_steps
from dist_launch import ACCELERATE
from hold_save.sitecustomize import hold_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 20
STEP8, STEP16 = "step_00000008", "step_00000016"
# The same global batches on every world size (module docstring).
SAME_BATCHES = ("data.block_size=1", "data.interleave_shards=1", "data.shuffle_buffer=1")


def _args(shard_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), f"data.train_manifest={shard_dir}", f"train.output_dir={out}",
            f"train.max_steps={STEPS}", "train.log_every_steps=1", "train.progress_bar=false",
            "checkpoint.every_steps=8", "train.sample_keys_log=true", *SAME_BATCHES, *extra]


def _config_file(config: str | Path) -> Path:
    return Path(config) if isinstance(config, Path) else REPO / "configs" / "accelerate" / f"{config}.yaml"


def _cmd(config: str | Path, args: list[str]) -> tuple[list[str], dict[str, str]]:
    env = {**cli_env(), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    if "zero" in str(config):
        # ACCELERATE_USE_CPU=true would make accelerate drop DeepSpeed for plain DDP (MULTI_CPU).
        env.pop("ACCELERATE_USE_CPU", None)
    else:
        env["ACCELERATE_USE_CPU"] = "true"
    entry = ["-m", "clicktower.launcher.train"]
    cmd = [ACCELERATE, "launch", "--config_file", str(_config_file(config)),
           "--main_process_port", str(free_port()), *entry, *args]
    return cmd, env


def _run(config: str | Path, args: list[str]) -> subprocess.CompletedProcess:
    cmd, env = _cmd(config, args)
    result = run(cmd, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _steps(out: Path) -> list[int]:
    """The steps of ``out/metrics.jsonl`` line by line. A resumed run's file starts with the
    resumed checkpoint's copy (its steps 1..N), then the steps it trained: each step once."""
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "final" / "query_tower" / "model.safetensors")


def _trainer_state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def _position(state: dict) -> tuple[int, int]:
    """The data position (epoch, global samples consumed); the loader state also lists the
    layouts the epoch was read under, which differ on another world size."""
    return state["loader"]["epoch"], state["loader"]["samples_consumed"]


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


def _run_until(cmd, env, reached, what: str, timeout: float = 300) -> None:
    """Launch ``cmd``, poll until ``reached()``, then kill its whole process tree."""
    from dist_harness import kill_tree

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not reached():
            assert proc.poll() is None, f"the run ended before {what}"
            assert time.monotonic() < deadline, f"no {what} in time"
            time.sleep(0.05)
    finally:
        kill_tree(proc, timeout=30)


def test_sigkill_inside_a_save_then_resume_is_bitwise_identical(reference, shard_dir, tmp_path):
    config, ref = reference
    out = tmp_path / "run"
    root = out / "checkpoints"
    torn = root / f".tmp-{STEP16}"
    cmd, env = _cmd(config, _args(shard_dir, out))
    # tests/support/hold_save (on the launch's PYTHONPATH) holds the step-16 save after every
    # rank wrote its shards, before the marker.
    # Every rank writes its own files (per-rank hashing): wait for both ranks' shards, not
    # only for rank 0's trainer state, before the kill.
    _run_until(cmd, hold_env(16, env),
               lambda: ((torn / "trainer_state.json").is_file()
                        and len(list((torn / "pytorch_model").glob("*optim_states.pt"))) == 2),
               "its step-16 save")
    # A real torn save: both ranks' ZeRO shards of step 16, no marker, never renamed.
    assert len(list((torn / "pytorch_model").glob("*optim_states.pt"))) == 2
    assert not (torn / "COMPLETE").exists() and (root / "latest").read_text().strip() == STEP8
    assert not (out / "final").exists() and not (root / STEP16).exists()
    # Beside it, a committed step-16 checkpoint of this run whose shard got corrupted since:
    # the reference's, made this run's commit after step 8 (its lineage record, re-marked),
    # named by latest. Passed over too, for the step-8 commit it follows.
    shutil.copytree(ref / "checkpoints" / STEP16, root / STEP16)
    state = _trainer_state(root / STEP16)
    step8 = _trainer_state(root / STEP8)["lineage"]
    state["lineage"] = {"id": step8["id"], "commit": step8["commit"] + 1, "parent": step8["commit"]}
    (root / STEP16 / "trainer_state.json").write_text(json.dumps(state))
    write_complete_marker(root / STEP16, 16)
    (root / "latest").write_text(STEP16 + "\n")
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
    assert _steps(out) == list(range(1, STEPS + 1))
    # Different reduction order (1 rank vs 2 ZeRO partitions): close, not bitwise.
    assert [got[s] for s in range(9, STEPS + 1)] == pytest.approx([expected[s] for s in range(9, STEPS + 1)],
                                                                  abs=1e-3)
    assert got[STEPS] < got[9]
    ref_state, state = _trainer_state(ref / "checkpoints" / STEP16), _trainer_state(out / "checkpoints" / STEP16)
    assert _position(state) == _position(ref_state) == (0, 16 * 32)
    assert state["topology"] == {"world_size": 1, "zero_stage": 0}
    # One rank now takes the global batch the two ranks took: the same keys at every step.
    expected_keys = keys_per_step(consumed_keys(ref))
    assert keys_per_step(consumed_keys(out)) == {s: expected_keys[s] for s in range(9, STEPS + 1)}


def test_ckpt_convert_writes_weights_and_every_optimizer_state(reference, tmp_path):
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from clicktower.launcher.engine.checkpoint.files import check_checkpoint

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


@pytest.fixture(scope="module")
def one_process_configs(tmp_path_factory) -> dict[str, Path]:
    """accelerate configs for ONE DeepSpeed process on the CPU (ZeRO-2, ZeRO-3): the 2-process
    ones with ``num_processes: 1``."""
    folder = tmp_path_factory.mktemp("accelerate")
    out = {}
    for stage in ("zero2", "zero3"):
        text = (REPO / "configs" / "accelerate" / f"cpu_2proc_{stage}.yaml").read_text()
        out[f"cpu_2proc_{stage}"] = folder / f"cpu_1proc_{stage}.yaml"
        out[f"cpu_2proc_{stage}"].write_text(text.replace("num_processes: 2", "num_processes: 1"))
    return out


def _check_resized(ref: Path, out: Path, result: subprocess.CompletedProcess, world: int, stage: int) -> None:
    """The resized run continued the never-resized one: converted through the universal
    format, losses within 1e-5, the same global batches, each sample once, the same data
    position at step 16."""
    assert "converting to a universal checkpoint" in result.stderr and "resumed from" in result.stdout
    assert not (out / "checkpoints" / f".universal-{STEP8}").exists()  # removed after the load
    _check_continued(ref, out, world, stage)


def _check_continued(ref: Path, out: Path, world: int, stage: int) -> None:
    """Losses within 1e-5 of the never-resized run from step 9, the same global batches, each
    sample once over steps 1-20, the same data position at step 16, the new topology."""
    expected, got = _losses(ref), _losses(out)
    assert _steps(out) == list(range(1, STEPS + 1))
    assert max(abs(got[s] - expected[s]) for s in range(9, STEPS + 1)) <= 1e-5
    ref_keys, keys = keys_per_step(consumed_keys(ref)), keys_per_step(consumed_keys(out))
    assert keys == {s: ref_keys[s] for s in range(9, STEPS + 1)}
    seen = [k for s in range(1, 9) for k in ref_keys[s]] + [k for s in range(9, STEPS + 1) for k in keys[s]]
    assert len(seen) == len(set(seen)) == STEPS * 32
    state = _trainer_state(out / "checkpoints" / STEP16)
    assert _position(state) == _position(_trainer_state(ref / "checkpoints" / STEP16)) == (0, 16 * 32)
    assert state["topology"] == {"world_size": world, "zero_stage": stage}


def test_zero_checkpoint_resumes_under_zero_on_one_process(reference, shard_dir, tmp_path, one_process_configs):
    config, ref = reference
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / STEP8, out / "checkpoints" / STEP8)
    result = _run(one_process_configs[config], _args(shard_dir, out, "train.batch_size=32"))
    _check_resized(ref, out, result, world=1, stage=int(config[-1]))


def _convert_offline(checkpoint: Path, universal: Path) -> None:
    """``clicktower ckpt convert --to universal`` (what a large model's user runs once)."""
    converted = clicktower("ckpt", "convert", str(checkpoint), "--out", str(universal), "--to", "universal")
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert (universal / "pytorch_model" / "zero").is_dir()


@pytest.mark.parametrize("reference", ["zero2"], indirect=True)
def test_offline_universal_checkpoint_resumes_on_one_process(reference, shard_dir, tmp_path, one_process_configs):
    """2 -> 1 under ZeRO-2 through an offline conversion: ``ckpt convert --to universal`` of
    the 2-process step-8 checkpoint, then ``train.resume=`` that folder on one process. Nothing
    is converted again, and the run continues the never-resized one."""
    config, ref = reference
    universal = tmp_path / "universal_8"
    _convert_offline(ref / "checkpoints" / STEP8, universal)
    out = tmp_path / "run"
    result = _run(one_process_configs[config], _args(shard_dir, out, "train.batch_size=32",
                                                     f"train.resume={universal}"))
    assert f"resumed from {universal} at step 8" in result.stdout and "converting" not in result.stderr
    _check_continued(ref, out, world=1, stage=2)


@pytest.mark.parametrize("reference", ["zero2"], indirect=True)
def test_one_process_zero_checkpoint_resumes_under_zero_on_two(reference, shard_dir, tmp_path, one_process_configs):
    """1 -> 2 under ZeRO-2: the new rank 1 holds no parameter of the one-scalar temperature
    group, which DeepSpeed's universal loader cannot handle by itself; converted on the fly,
    and again through an offline ``ckpt convert --to universal`` and ``train.resume=`` it."""
    config, _ = reference
    ref = tmp_path / "ref"
    _run(one_process_configs[config], _args(shard_dir, ref, "train.resume=none", "train.batch_size=32"))
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / STEP8, out / "checkpoints" / STEP8)
    result = _run(config, _args(shard_dir, out, "train.batch_size=16"))
    _check_resized(ref, out, result, world=2, stage=2)

    universal, offline = tmp_path / "universal_8", tmp_path / "offline"
    _convert_offline(ref / "checkpoints" / STEP8, universal)
    result = _run(config, _args(shard_dir, offline, "train.batch_size=16", f"train.resume={universal}"))
    assert f"resumed from {universal} at step 8" in result.stdout and "converting" not in result.stderr
    _check_continued(ref, offline, world=2, stage=2)


@pytest.mark.parametrize("reference", ["zero2"], indirect=True)
def test_async_save_killed_while_writing_then_resumed(reference, shard_dir, tmp_path):
    """The step-16 write held in its background thread: training goes on to step 20 while
    the save is in flight; a SIGKILL then leaves step 8 as the latest. The resume is bitwise
    identical, verified by one process of the node; async checkpoints load through
    ``load_state`` (the resume), ``zero_to_fp32`` and the universal conversion."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from clicktower.launcher.engine.checkpoint.files import check_checkpoint

    config, ref = reference
    out, record = tmp_path / "run", tmp_path / "verified.txt"
    root = out / "checkpoints"
    torn = root / f".tmp-{STEP16}"
    cmd, env = _cmd(config, _args(shard_dir, out, "checkpoint.async_save=true"))
    _run_until(cmd, hold_env(16, env, "HOLD_WRITE_STEP"),
               lambda: (out / "metrics.jsonl").is_file() and max(_losses(out)) >= STEPS,
               f"step {STEPS} with its step-16 save held")
    # Trained to the end while step 16 was being written: both ranks' shards there, no marker.
    assert len(list((torn / "pytorch_model").glob("*optim_states.pt"))) == 2
    assert not (torn / "COMPLETE").exists() and not (root / STEP16).exists()
    assert (root / "latest").read_text().strip() == STEP8 and check_checkpoint(root / STEP8) is None

    cmd, env = _cmd(config, _args(shard_dir, out, "checkpoint.async_save=true"))
    result = run(cmd, cwd=REPO, env=hold_env(None, env, record=str(record)), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {root / STEP8} at step 8" in result.stdout
    assert f"skipping checkpoint {torn}: incomplete" in result.stderr
    expected, got = _losses(ref), _losses(out)
    assert [got[s] for s in range(9, STEPS + 1)] == [expected[s] for s in range(9, STEPS + 1)]
    assert all(bool((a == b).all()) for a, b in zip(_weights(ref).values(), _weights(out).values()))
    assert consumed_keys(out) == consumed_keys(ref)
    # Two ranks on one node: one process verified the checksums, the other got its answer.
    verified = [line.split() for line in record.read_text().splitlines()]
    assert verified and len({pid for pid, _ in verified}) == 1

    assert check_checkpoint(root / STEP16) is None  # the ranks' gathered digests hold
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(root / STEP16), tag="pytorch_model")
    ref_fp32 = get_fp32_state_dict_from_zero_checkpoint(str(ref / "checkpoints" / STEP16), tag="pytorch_model")
    assert fp32.keys() == ref_fp32.keys() and all(torch.equal(fp32[k], ref_fp32[k]) for k in fp32)
    universal = tmp_path / "universal"
    converted = clicktower("ckpt", "convert", str(root / STEP16), "--out", str(universal), "--to", "universal")
    assert converted.returncode == 0, converted.stderr[-2000:]
    for name, tensor in fp32.items():
        saved = torch.load(universal / "pytorch_model" / "zero" / name / "fp32.pt", weights_only=False)
        assert torch.equal(saved["param"].flatten(), tensor.flatten()), name
