"""Operations that never lie about NaN (issue 26, case 4): a global batch whose sample weights
are all 0 is defined (loss 0, zero gradient) in one process and across ranks; every step's
loss and gradient norm are checked before the optimiser steps and before any save; and, end to
end, shards with all-zero weights for a stretch train without NaN and save finite checkpoints,
while a NaN checkpoint left by an older version is refused on resume with one line.

The checkpointer's own refusals (a NaN model is never written, a NaN checkpoint never loaded)
are in tests/test_checkpoint.py."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clicktower.kernels.labels import PairLabels
from clicktower.modeling.losses import ContrastiveLoss

from conftest import TINY_CONFIG, clicktower


def _embeddings(n: int = 6, hard: int = 3, dim: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [F.normalize(torch.randn(rows, dim, generator=g), dim=-1).requires_grad_() for rows in (n, n, hard)]


@pytest.mark.unit
@pytest.mark.parametrize("symmetric", [False, True])
def test_all_zero_weights_give_loss_zero_and_zero_gradient(symmetric):
    """Weights >= 0 are legal (a relevance grade of 0): an all-zero batch was 0 / 0 = NaN."""
    q, k, h = _embeddings()
    scale = torch.tensor(20.0, requires_grad=True)
    labels = PairLabels(item_ids=torch.arange(6), query_ids=torch.arange(6) + 10, weights=torch.zeros(6),
                        hard_negative_ids=torch.tensor([1, -1, 7]), hard_negative_owner=torch.tensor([0, 1, 1]),
                        teacher_scores=torch.tensor([[2.0, 1.0], [3.0, 0.5]] + [[1.0, float("nan")]] * 4))
    loss_fn = ContrastiveLoss(symmetric, block_size=4, distill_weight=0.5)
    loss = loss_fn(q, k, scale, labels, h)
    loss.backward()
    assert loss.item() == 0.0 and float(loss_fn.last_total_weight) == 0.0
    for grad in (q.grad, k.grad, h.grad, scale.grad):
        assert torch.equal(grad, torch.zeros_like(grad))
    # Some zeros among positive weights: the weighted mean over the others, as defined (the
    # zero-weight pairs' items still negatives).
    from dist_workers import reference_loss

    weights = torch.tensor([0.0, 0.0, 1.0, 2.0, 0.0, 0.5])
    part = ContrastiveLoss(symmetric, block_size=4)(q, k, scale, PairLabels(weights=weights))
    torch.testing.assert_close(part, reference_loss(q, k, scale, weights=weights, symmetric=symmetric))


@pytest.mark.multiprocess
def test_zero_weight_global_batch_across_ranks():
    """2 gloo ranks: every rank's weights 0 -> loss 0 and zero gradients on both ranks (the
    global total decides, the same on every rank); rank 0's weights 0 and rank 1's not -> the
    single-process weighted loss of the global batch (rank 0's pairs still negatives)."""
    from dist_harness import run_ranks
    from dist_workers import assert_gradient_contract, reference_loss
    from dist_zero_weight import MODES, scenario_weights, zero_weight_worker

    results = run_ranks(zero_weight_worker, 2)
    for symmetric, gather in MODES:
        for r in results:
            got = r["all_zero", symmetric, gather]
            assert got["loss"].item() == 0.0 and got["total_weight"] == 0.0
            for name in ("q", "k", "h", "s"):
                assert torch.equal(got[name], torch.zeros_like(got[name])), (symmetric, gather, name)
        weights = scenario_weights("rank0_zero")

        def reference(data, case, q, k, s, h, symmetric=symmetric):
            return reference_loss(q, k, s, data["item_ids"], data["query_ids"], h, data["hn_ids"], weights, symmetric)

        per_rank = [r["rank0_zero", symmetric, gather] for r in results]
        assert all(p["total_weight"] == pytest.approx(float(weights.sum())) for p in per_rank)
        assert_gradient_contract(per_rank, (symmetric, True), reference, dict(rtol=1e-5, atol=1e-5))


class _Loader:
    """Batches of ``dist_gradcache.batch`` for a TrainLoop; ``weights`` (step -> weights)
    gives some steps sample weights."""

    def __init__(self, weights: dict[int, torch.Tensor]) -> None:
        self.weights, self.epoch, self.served = weights, 0, 0

    def __iter__(self):
        from dataclasses import replace

        from dist_gradcache import batch

        while True:
            self.served += 1
            b = batch(0, self.served)
            yield replace(b, labels=replace(b.labels, weights=self.weights.get(self.served)))

    def state_dict(self) -> dict:
        return {"served": self.served}

    def error_counts(self) -> dict:
        return {}


def _train_step(max_grad_norm: float | None = 1.0):
    from accelerate import Accelerator

    from clicktower.launcher.engine.optim import Optimization
    from clicktower.launcher.engine.step import TrainStep
    from dist_gradcache import prepared_sgd_model

    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = prepared_sgd_model(accelerator, 0.1)
    return TrainStep(accelerator, model, ContrastiveLoss(True, False), Optimization(optimizer, scheduler, max_grad_norm))


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.unit
def test_zero_weight_step_is_a_finite_step_without_movement():
    """Through the real TrainStep: loss 0, zero gradient, so plain SGD leaves every weight."""
    from dist_gradcache import batch

    step = _train_step()
    before = _params(step.model)
    b = batch(0, 1)
    loss = step(_weighted(b, torch.zeros(8)))
    assert loss.item() == 0.0 and step.scheduler.last_epoch == 1
    assert all(torch.equal(a, p) for a, p in zip(before, step.model.parameters()))


def _weighted(b, weights):
    from dataclasses import replace

    return replace(b, labels=replace(b.labels, weights=weights))


@pytest.mark.unit
@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_nonfinite_loss_or_gradient_stops_the_step_before_the_optimiser(max_grad_norm):
    """A NaN weight (bad input) makes the loss NaN; a NaN gradient with a finite loss (here
    from a hook on the temperature's gradient) is caught by the gradient norm, with clipping
    (its norm) or without (the norm computed for the check). Neither reaches the weights, the
    optimiser or the schedule; the message names what and says what to do."""
    from clicktower.launcher.engine.step import NonFiniteStep
    from dist_gradcache import batch

    step = _train_step(max_grad_norm)
    before = _params(step.model)
    weights = torch.ones(8)
    weights[3] = float("nan")
    with pytest.raises(NonFiniteStep, match=r"non-finite loss: loss nan, gradient norm nan, total sample weight "
                                            r"of the global batch nan; the optimiser did not step") as bad_loss:
        step(_weighted(batch(0, 1), weights))
    assert "optim.lr" in str(bad_loss.value) and "train.resume=auto" in str(bad_loss.value)
    step.optimizer.zero_grad(set_to_none=True)  # the failed step's NaN gradients (a run would stop here)
    handle = step.model.log_logit_scale.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    with pytest.raises(NonFiniteStep, match=r"non-finite gradient norm: loss [0-9.]+, gradient norm nan, total "
                                            r"sample weight of the global batch 8"):
        step(batch(0, 2))
    handle.remove()
    assert all(torch.equal(a, p) for a, p in zip(before, step.model.parameters()))
    assert step.scheduler.last_epoch == 0
    step.optimizer.zero_grad(set_to_none=True)
    assert math.isfinite(step(batch(0, 3)).item()) and step.scheduler.last_epoch == 1  # and on it goes


@pytest.mark.unit
def test_loop_stops_at_the_nonfinite_step_before_its_checkpoint(tmp_path):
    """TrainLoop with a checkpoint every step: step 3's NaN loss raises, naming step 3, before
    the checkpoint observer runs: steps 1 and 2 are saved, nothing of step 3."""
    from clicktower.launcher.engine.checkpoint import CheckpointConfig, Checkpointer, list_checkpoints
    from clicktower.launcher.engine.loop import TrainConfig, TrainLoop
    from clicktower.launcher.engine.observers import CheckpointObserver
    from clicktower.launcher.engine.step import NonFiniteStep

    step = _train_step()
    step.accelerator.register_for_checkpointing(step.scheduler)
    bad = torch.ones(8)
    bad[0] = float("inf")
    checkpointer = Checkpointer(step.accelerator, tmp_path, CheckpointConfig(every_steps=1, keep_last=5), "")
    loop = TrainLoop(step, _Loader({3: bad}), TrainConfig(max_steps=5, output_dir=str(tmp_path), progress_bar=False),
                     [CheckpointObserver(checkpointer)])
    with pytest.raises(NonFiniteStep, match=r"^step 3: non-finite loss"):
        loop.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"


@pytest.fixture(scope="module")
def zero_stretch_shards(synth_dir, tmp_path_factory) -> tuple[Path, list[float]]:
    """400 synthetic pairs whose grade is 0 for every third run of 16 rows (1 or 0.5
    elsewhere), sharded by the CLI in shards of 96: with 16-sample blocks, one-batch shuffle
    windows and batches of 16, each batch is one run of 16 rows, so every third batch has
    total weight 0."""
    rows = [json.loads(line) for line in (synth_dir / "train.jsonl").read_text().splitlines()][:400]
    grades = [0.0 if (i // 16) % 3 == 0 else (1.0 if i % 2 else 0.5) for i in range(len(rows))]
    path = tmp_path_factory.mktemp("zero_weights") / "pairs.jsonl"
    path.write_text("".join(json.dumps({**row, "grade": g}) + "\n" for row, g in zip(rows, grades)))
    out = path.parent / "shards"
    result = clicktower("shard", str(path), "--out", str(out), "--shard-size", "96", "--weight-field", "grade")
    assert result.returncode == 0, result.stderr[-2000:]
    return out, grades


def _all_finite(folder: Path) -> int:
    """Checks every safetensors file under ``folder``; returns how many tensors were read."""
    from safetensors.torch import load_file

    count = 0
    for path in folder.rglob("*.safetensors"):
        for name, tensor in load_file(str(path)).items():
            assert torch.isfinite(tensor).all(), f"{path}: {name}"
            count += 1
    return count


@pytest.mark.e2e
@pytest.mark.slow
def test_zero_weight_stretch_trains_finite_and_a_nan_checkpoint_is_refused(zero_stretch_shards, tmp_path):
    """``clicktower train`` (tiny config) on shards with all-zero weights for a stretch: every
    all-zero step logs loss 0 exactly, every other a positive finite loss, and every checkpoint
    and the final towers are finite. Then the step-20 checkpoint is replaced by one with NaN
    weights and a valid marker (what an older version saved): the resume refuses it, naming
    the folder, in one line with exit status 2."""
    from clicktower.launcher.engine.checkpoint.files import write_complete_marker
    from safetensors.torch import load_file, save_file

    shards, grades = zero_stretch_shards
    out = tmp_path / "run"
    command = ["train", "--config", str(TINY_CONFIG), f"data.train_manifest={shards}", f"train.output_dir={out}",
               "train.log_every_steps=1", "train.progress_bar=false", "train.sample_keys_log=true",
               "checkpoint.every_steps=5", "checkpoint.keep_last=4", "data.block_size=16",
               "data.shuffle_buffer=16", "data.interleave_shards=1"]
    result = clicktower(*command, "train.max_steps=20")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = {m["step"]: m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in m}
    keys = {r["step"]: r["keys"] for r in map(json.loads, (out / "sample_keys" / "rank_0.jsonl").read_text()
                                                 .splitlines())}
    # A key is "input number-row" (row 1-based).
    totals = {step: sum(grades[int(key.split("-")[1]) - 1] for key in step_keys) for step, step_keys in keys.items()}
    zero_steps = [step for step, total in totals.items() if total == 0]
    assert sorted(losses) == list(range(1, 21)) and len(zero_steps) >= 3, totals
    assert all(losses[step] == 0.0 for step in zero_steps)
    assert all(math.isfinite(losses[step]) and losses[step] > 0 for step in losses if step not in zero_steps)
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_00000005", "step_00000010", "step_00000015", "step_00000020"]
    assert all(_all_finite(out / "checkpoints" / name) > 0 for name in checkpoints)
    assert _all_finite(out / "final") > 0

    last = out / "checkpoints" / "step_00000020"
    weights = load_file(str(last / "model.safetensors"))
    save_file({name: torch.full_like(t, float("nan")) for name, t in weights.items()}, str(last / "model.safetensors"),
              metadata={"format": "pt"})
    write_complete_marker(last, 20)
    refused = clicktower(*command, "train.max_steps=25")
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith(f"clicktower: error: {last}: ") and "NaN or inf" in line and "train.resume" in line
    assert max(map(json.loads, (out / "metrics.jsonl").read_text().splitlines()), key=lambda m: m["step"])["step"] == 20
