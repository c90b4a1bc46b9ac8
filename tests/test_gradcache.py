"""GradCache (train.grad_cache_chunk) makes the same parameter update as one big backward:
2 processes under DDP, DeepSpeed ZeRO-2 and ZeRO-3, through `accelerate launch` and the real
TrainStep (dropout off, fp32, SGD lr 1 so the update is the gradient; 8 pairs per
rank in chunks of 3, 3 and 2; two steps).

With dropout 0.1 (DDP and ZeRO-2; `dist_gradcache.py ... replay`, which wraps the model's
forward to record every call): each chunk's replay reproduces its first forward's embeddings
bit for bit, and the update equals plain autograd's through the same chunks under the same
RNG states (an unchunked forward would draw other masks, so it is no reference here).

Also plain gradient accumulation (gradient_accumulation_steps=2, `dist_accumulate.py`): one
update per two micro-batches, equal to the mean of their separate updates, under DDP and
ZeRO-2; and, in one process, that ``TrainLoop.fit`` counts optimiser steps."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conftest import SUPPORT
from dist_launch import accelerate_launch

HELPER = str(SUPPORT / "dist_gradcache.py")


def _run(config: str, chunk: str, out: Path, *extra: str) -> dict:
    result = accelerate_launch(config, [HELPER, str(out), chunk, *extra])
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return _run("cpu_2proc_ddp", "none", tmp_path_factory.mktemp("gc") / "ref.pt")


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("config", ["cpu_2proc_ddp", "cpu_2proc_zero2", "cpu_2proc_zero3"])
def test_chunked_update_equals_unchunked(reference, config, tmp_path):
    chunked = _run(config, "3", tmp_path / "chunked.pt")
    assert chunked["losses"] == pytest.approx(reference["losses"], abs=1e-6)
    moved = 0.0
    for name, ref in reference["params"].items():
        torch.testing.assert_close(chunked["params"][name], ref, rtol=1e-5, atol=1e-5, msg=name)
        moved = max(moved, float(ref.abs().max()))
    assert moved > 0


@pytest.fixture(scope="module")
def hard_reference(tmp_path_factory) -> dict:
    return _run("cpu_2proc_ddp", "none", tmp_path_factory.mktemp("gc_hard") / "ref.pt", "hard")


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("config", ["cpu_2proc_ddp", "cpu_2proc_zero2"])
def test_chunked_update_with_hard_negatives_equals_unchunked(reference, hard_reference, config, tmp_path):
    """Hard negatives (3 on rank 0, 2 on rank 1) and exclusion lists in every batch: GradCache
    in chunks of 3, 3 and 2, the negatives embedded in chunks alongside (1, 1, 1 and 1, 1, 0)
    and cached like the items, makes the unchunked DDP update, under DDP and ZeRO-2."""
    chunked = _run(config, "3", tmp_path / "chunked.pt", "hard")
    assert chunked["losses"] == pytest.approx(hard_reference["losses"], abs=1e-6)
    for name, ref in hard_reference["params"].items():
        torch.testing.assert_close(chunked["params"][name], ref, rtol=1e-5, atol=1e-5, msg=name)
    # Not vacuous: the negatives change the loss and the update.
    assert hard_reference["losses"][0] != pytest.approx(reference["losses"][0], abs=1e-3)
    assert any(not torch.allclose(hard_reference["params"][k], v, atol=1e-5) for k, v in reference["params"].items())


@pytest.mark.e2e
@pytest.mark.slow
def test_unchunked_zero2_equals_ddp(reference, tmp_path):
    plain = _run("cpu_2proc_zero2", "none", tmp_path / "plain.pt")
    for name, ref in reference["params"].items():
        torch.testing.assert_close(plain["params"][name], ref, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.e2e
@pytest.mark.slow
def test_chunked_update_with_popularity_correction_and_memory_equals_unchunked(hard_reference, tmp_path):
    """With streaming logQ and a cross-batch memory (used at step 2) on top of hard negatives
    and exclusions, GradCache in chunks of 3, 3 and 2 makes the unchunked DDP update: the
    levers sit in the loss, which GradCache calls once on the whole batch's embeddings."""
    unchunked = _run("cpu_2proc_ddp", "none", tmp_path / "ref.pt", "hard+levers")
    chunked = _run("cpu_2proc_ddp", "3", tmp_path / "chunked.pt", "hard+levers")
    assert chunked["losses"] == pytest.approx(unchunked["losses"], abs=1e-6)
    for name, ref in unchunked["params"].items():
        torch.testing.assert_close(chunked["params"][name], ref, rtol=1e-5, atol=1e-5, msg=name)
    for step in range(2):  # not vacuous: the levers change both steps' losses
        assert unchunked["losses"][step] != pytest.approx(hard_reference["losses"][step], abs=1e-3)


MODEL_INPUTS = ("query_input_ids", "query_attention_mask", "item_input_ids", "item_attention_mask")


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("config", ["cpu_2proc_ddp", "cpu_2proc_zero2"])
def test_dropout_replay_is_bitwise_and_the_update_is_autograds(config, tmp_path):
    """Dropout 0.1, chunks of 3, 3 and 2, two steps on each of 2 ranks: every chunk's forward
    with grad (the replay) is called with the RNG state of its first, no-grad forward and
    reproduces its embeddings bit for bit, dropout masks included; and the update equals
    plain autograd's through the same chunks under the same RNG states (the full-batch loss on
    the concatenated embeddings, one backward), to float reassociation."""
    result = accelerate_launch(config, [HELPER, str(tmp_path / "out.pt"), "3", "replay", "0.1"])
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [torch.load(tmp_path / f"out.pt.{rank}", weights_only=False) for rank in range(2)]
    for step in range(2):  # the step's loss (mean over ranks) is the reference's
        assert runs[0]["steps"][step]["loss"] == pytest.approx(
            sum(run["steps"][step]["reference"]["loss"] for run in runs) / 2, abs=1e-6)
    for rank, run in enumerate(runs):
        assert run["world"] == 2 and run["rank"] == rank
        for step, record in enumerate(run["steps"]):
            where = f"{config} rank {rank} step {step}"
            calls, ref = record["calls"], record["reference"]
            # Three chunks: three forwards without grad, then the three replays with grad.
            assert [c["grad"] for c in calls] == [False] * 3 + [True] * 3, where
            first, replay = calls[:3], calls[3:]
            for name in MODEL_INPUTS:  # the chunks cover the local batch, in order
                assert torch.equal(torch.cat([c["inputs"][name] for c in first]), record["batch"][name]), where
            for index, (a, b) in enumerate(zip(first, replay)):
                assert all(torch.equal(a["inputs"][k], b["inputs"][k]) for k in MODEL_INPUTS), where
                assert all(x is y is None or torch.equal(x, y) for x, y in zip(a["rng"], b["rng"])), \
                    f"{where} chunk {index}: RNG state not replayed"  # CPU (and CUDA) generator
                for x, y in zip(a["out"], b["out"]):
                    assert torch.equal(x, y), f"{where} chunk {index}: replayed embeddings differ"
                # The autograd reference under the same state draws the same masks too.
                assert all(torch.equal(x, y) for x, y in zip(a["out"], ref["out"][index])), where
            # Not vacuous: the chunks draw from an advancing stream, and another state gives
            # other masks, so other embeddings.
            assert not torch.equal(first[0]["rng"][0], first[1]["rng"][0]), where
            assert not torch.equal(first[0]["out"][0], ref["other_mask"][0]), where
            assert not torch.equal(first[0]["out"][1], ref["other_mask"][1]), where
            moved = 0.0
            for name, grad in ref["grads"].items():
                update = record["before"][name] - record["after"][name]  # SGD lr 1
                torch.testing.assert_close(update, grad, rtol=1e-5, atol=1e-6, msg=f"{where}: {name}")
                moved = max(moved, float(grad.abs().max()))
            assert moved > 0, where


def _fake_accelerator(steps: int, deepspeed_config: dict | None = None) -> SimpleNamespace:
    plugin = None if deepspeed_config is None else SimpleNamespace(deepspeed_config=deepspeed_config)
    return SimpleNamespace(gradient_accumulation_steps=steps, num_processes=2,
                           state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.unit
def test_gradient_accumulation_warns_that_it_shrinks_the_negative_pool(caplog, monkeypatch):
    """Plain accumulation (from accelerate or from the DeepSpeed file) is flagged by the
    launch checks the entry point runs; GradCache is the suggested fix; none without it."""
    from clicktower.launcher.engine.distributed import prepare_launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with caplog.at_level(logging.WARNING, logger="clicktower"):
        prepare_launch(_fake_accelerator(1), 8, None)
        assert not caplog.records
        prepare_launch(_fake_accelerator(4), 8, None)
        ds_config = {"gradient_accumulation_steps": 3}
        prepare_launch(_fake_accelerator(1, ds_config), 8, None)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "gradient_accumulation_steps=4" in messages[0] and "8 x 2 pairs" in messages[0]
    assert "gradient_accumulation_steps=3" in messages[1]
    assert all("train.grad_cache_chunk" in m for m in messages)
    assert ds_config["train_batch_size"] == 8 * 3 * 2


# --- Plain gradient accumulation (gradient_accumulation_steps=k): one update per k micro-batches.

ACCUMULATE = str(SUPPORT / "dist_accumulate.py")


def _accumulate(config: str, tmp: Path) -> tuple[dict, Path]:
    run_dir = tmp / "run"
    result = accelerate_launch(config, [ACCUMULATE, str(tmp / "out.pt"), str(run_dir)])
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp / "out.pt"), run_dir


@pytest.fixture(scope="module")
def accumulated_ddp(tmp_path_factory) -> tuple[dict, Path]:
    return _accumulate("cpu_2proc_ddp", tmp_path_factory.mktemp("accum_ddp"))


def _assert_one_mean_update(run: dict, reference: dict) -> None:
    assert run["accumulation_steps"] == 2
    assert run["step"] == 1 and run["scheduler_steps"] == 1  # one optimiser step, one LR step
    assert run["served"] == 2  # no micro-batch read beyond the step
    for name, ref in reference["reference"].items():
        torch.testing.assert_close(run["params"][name], ref, rtol=1e-5, atol=1e-5, msg=name)
    # Not vacuous: the mean update is not the first micro-batch's update.
    assert any(not torch.allclose(reference["first_alone"][k], v, atol=1e-4)
               for k, v in reference["reference"].items())


@pytest.mark.e2e
def test_accumulated_step_is_the_mean_of_the_micro_batch_updates_ddp(accumulated_ddp):
    """k=2 under 2-process DDP through the real TrainLoop.fit: ONE update equal to the mean of
    the two micro-batches' separate k=1 updates (SGD lr 1, so the update is the gradient)."""
    run, run_dir = accumulated_ddp
    _assert_one_mean_update(run, run)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]
    assert metrics[0]["loss"] == pytest.approx(run["reference_loss"], abs=1e-6)  # mean of both
    for rank in range(2):
        lines = [json.loads(line) for line in (run_dir / "sample_keys" / f"rank_{rank}.jsonl").read_text().splitlines()]
        assert [(r["step"], r["keys"]) for r in lines] == \
            [(1, [f"r{rank}m{m}k{i}" for m in range(2) for i in range(8)])]


@pytest.mark.e2e
@pytest.mark.slow
def test_accumulated_step_under_zero2_equals_ddp_reference(accumulated_ddp, tmp_path):
    """The same step under DeepSpeed ZeRO-2 with gradient_accumulation_steps 2 (the engine
    divides the loss by k, accelerate does not: divided once)."""
    run, _ = _accumulate("cpu_2proc_zero2", tmp_path)
    _assert_one_mean_update(run, accumulated_ddp[0])


class _EpochLoader:
    """Epochs of ``per_epoch`` tiny batches; keys name the epoch and the batch."""

    def __init__(self, per_epoch: int) -> None:
        self.per_epoch, self.epoch, self.served = per_epoch, 0, 0

    def __iter__(self):
        from dataclasses import replace

        from dist_gradcache import batch

        for index in range(self.per_epoch):
            self.served += 1
            yield replace(batch(0, self.served), keys=[f"e{self.epoch}b{index}k{i}" for i in range(8)])
        self.epoch += 1

    def error_counts(self) -> dict:
        return {}


def _local_trainer(tmp_path: Path, steps: int, **train) -> Any:
    from accelerate import Accelerator

    from clicktower.launcher.engine.loop import TrainConfig, TrainLoop
    from clicktower.launcher.engine.metrics import MetricsLog
    from clicktower.launcher.engine.observers import MetricsObserver, SampleKeysObserver
    from clicktower.launcher.engine.optim import Optimization
    from clicktower.launcher.engine.step import TrainStep
    from clicktower.modeling.losses import ContrastiveLoss
    from dist_gradcache import prepared_sgd_model

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=steps)
    model, optimizer, scheduler = prepared_sgd_model(accelerator, 0.1)
    cfg = TrainConfig(batch_size=8, output_dir=str(tmp_path), progress_bar=False, sample_keys_log=True, **train)
    step = TrainStep(accelerator, model, ContrastiveLoss(True, False), Optimization(optimizer, scheduler, 1.0),
                     cfg.grad_cache_chunk)
    observers = [MetricsObserver(MetricsLog(tmp_path / "metrics.jsonl", True), cfg, True),
                 SampleKeysObserver(tmp_path, 0)]
    return TrainLoop(step, _EpochLoader(3), cfg, observers)


@pytest.fixture
def one_batch_per_step_after():
    """accelerate's gradient-accumulation state is a process-wide singleton: restore k=1."""
    yield
    from accelerate.state import GradientState

    GradientState().plugin_kwargs.update({"num_steps": 1})


@pytest.mark.unit
def test_fit_counts_optimiser_steps_with_accumulation(tmp_path, one_batch_per_step_after):
    """In one process, k=2 over epochs of 3 batches: every step takes 2 micro-batches (step
    2 straddles the epoch end), logging every 2 steps counts steps, not micro-batches, and
    the sample-keys log holds all of each step's keys."""
    loop = _local_trainer(tmp_path, 2, max_steps=3, log_every_steps=2)
    loop.fit()
    assert loop.step == 3 and loop.train_step.scheduler.last_epoch == 3 and loop.loader.served == 6
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 3]
    assert all(math.isfinite(m["loss"]) and m["pairs_per_sec"] > 0 for m in metrics)
    records = [json.loads(line) for line in (tmp_path / "sample_keys" / "rank_0.jsonl").read_text().splitlines()]
    keys = [[f"e{e}b{b}k{i}" for e, b in micro for i in range(8)]
            for micro in ([(0, 0), (0, 1)], [(0, 2), (1, 0)], [(1, 1), (1, 2)])]
    # Step 2's keys are half epoch 0 (its first micro-batch), half epoch 1.
    epochs = [[0] * 16, [0] * 8 + [1] * 8, [1] * 16]
    assert [(r["step"], r["epochs"], r["keys"]) for r in records] == \
        [(step, epochs[step - 1], keys[step - 1]) for step in (1, 2, 3)]
    with pytest.raises(ValueError, match="takes 2 micro-batches"):
        loop.train_step(next(iter(loop.loader)))


@pytest.mark.unit
def test_grad_cache_with_accumulation_is_a_config_error(tmp_path, one_batch_per_step_after):
    from clicktower.launcher.errors import ConfigError

    with pytest.raises(ConfigError, match="grad_cache_chunk cannot be combined with gradient_accumulation_steps=2"):
        _local_trainer(tmp_path, 2, grad_cache_chunk=4)


@pytest.mark.multiprocess
def test_short_gradcache_batch_fails_on_every_rank_at_once():
    """2 gloo ranks, GradCache in chunks of 1 pair, local batches of 3 and 5 pairs (rank 0's
    bad samples skipped): the step would need 5 chunks on each rank. Both ranks raise the same
    ShortGradCacheBatch before any forward, naming the chunk size that fits; neither is left
    waiting in the loss's gather (run_ranks' 60 s limit)."""
    from dist_harness import run_ranks
    from dist_workers import short_gradcache_worker

    results = run_ranks(short_gradcache_worker, 2, timeout=60.0)
    assert [r["raised"] for r in results] == ["ShortGradCacheBatch"] * 2
    assert results[0]["message"] == results[1]["message"]
    assert "only 3 pair(s)" in results[0]["message"] and "train.grad_cache_chunk >= 2" in results[0]["message"]
