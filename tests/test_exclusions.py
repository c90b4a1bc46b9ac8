"""Per-sample exclusions (``exclude_ids``) and distillation in the loss, against dense
references that build the full logits, mask them and take the cross-entropy.

Every mode: the fused kernels alone (sparse and dense tile masks), ``ContrastiveLoss`` in
one process, across 2 gloo ranks (gather_queries true and false, ranks listing different
numbers of ids or none), and the trainer's ``TrainStep`` with hard negatives, plainly and with
GradCache (the negatives embedded in chunks and cached like the items).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dist_exclude import (CASES, DISTILL_T, DISTILL_WEIGHT, OWNERS, TEACHER, case_reference, distill_reference,
                          exclusion_loss_worker, exclusion_step_worker, global_exclude, step_reference)
from dist_harness import run_ranks
from dist_workers import MASKS, assert_gradient_contract, global_batch, reference_loss

from clicktower.kernels.labels import PairLabels
from clicktower.kernels import fused_contrastive_loss, fused_symmetric_contrastive_loss
from clicktower.modeling.losses import ContrastiveLoss, LossConfig

from conftest import TINY_CONFIG

WORLD = 2
TOL = dict(rtol=1e-5, atol=1e-5)
EXACT = dict(rtol=1e-10, atol=1e-10)


def _fp64(data: dict) -> dict:
    return {k: v.double().requires_grad_() if k in ("q", "k", "h", "scale") else v for k, v in data.items()}


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.fixture(params=["sparse", "dense", "gpu_path"])
def tile_masks(request, monkeypatch):
    """Every mask representation of the kernel: the sparse pair list (CPU default), the dense
    per-tile comparison (many collisions), forced by a zero pair budget, and the GPU path
    forced on the CPU (dense tiles, no per-tile host reads)."""
    if request.param == "dense":
        monkeypatch.setattr("clicktower.kernels.pair_masks._SPARSE_PAIRS_PER_ROW", 0)
    if request.param == "gpu_path":
        monkeypatch.setattr("clicktower.kernels.contrastive._on_host", lambda device: False)
    return request.param


@pytest.mark.unit
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("masks", ["none", "both"])
@pytest.mark.parametrize("block", [2, None])
def test_loss_with_exclusions_matches_dense_reference(tile_masks, symmetric, hard, masks, block):
    d = _fp64(global_batch())
    exclude = global_exclude("both")
    items, queries = MASKS[masks]
    labels = PairLabels(item_ids=d["item_ids"], query_ids=d["query_ids"], weights=d["weights"], exclude_ids=exclude,
                        hard_negative_ids=d["hn_ids"] if hard else None)
    loss = ContrastiveLoss(symmetric, False, False, items, queries, block_size=block)(d["q"], d["k"], d["scale"],
                                                                                        labels, d["h"] if hard else None)
    ref = reference_loss(d["q"], d["k"], d["scale"], d["item_ids"], d["query_ids"] if queries else None,
                         d["h"] if hard else None, d["hn_ids"] if hard else None, d["weights"], symmetric,
                         exclude=exclude, mask_items=items)
    torch.testing.assert_close(loss, ref, **EXACT)
    tensors = [d["q"], d["k"], d["scale"]] + ([d["h"]] if hard else [])
    for got, want in zip(_grads(loss, tensors), _grads(ref, tensors)):
        torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.unit
@pytest.mark.parametrize("symmetric", [False, True])
def test_exclusions_mask_something_and_never_the_own_positive(symmetric):
    """Not vacuous: the lists change the loss in both directions (also with both duplicate
    halves on); a list naming only the pair's own item changes nothing beyond what the
    duplicate-item half masks already (the positive itself stays)."""
    d = global_batch()
    base = PairLabels(item_ids=d["item_ids"], query_ids=d["query_ids"])
    loss_fn = ContrastiveLoss(symmetric, False)
    plain = loss_fn(d["q"], d["k"], d["scale"], base)
    listed = loss_fn(d["q"], d["k"], d["scale"], replace(base, exclude_ids=global_exclude("both")))
    assert abs(float(plain) - float(listed)) > 1e-3
    own = d["item_ids"][:, None].clone()
    torch.testing.assert_close(loss_fn(d["q"], d["k"], d["scale"], replace(base, exclude_ids=own)), plain, **TOL)
    if symmetric:  # item->query alone: a query leaves the items it lists
        only_items = reference_loss(d["q"], d["k"], d["scale"], d["item_ids"], d["query_ids"], symmetric=True)
        assert abs(float(listed) - float(only_items)) > 1e-3


@pytest.mark.unit
def test_exclude_ids_need_item_ids():
    d = global_batch()
    with pytest.raises(ValueError, match="exclude_ids needs item_ids"):
        ContrastiveLoss(True, False)(d["q"], d["k"], d["scale"], PairLabels(exclude_ids=global_exclude("both")))


@pytest.mark.unit
@pytest.mark.parametrize("block", [3, None])
def test_fused_kernels_take_exclude_ids(tile_masks, block):
    """fused_contrastive_loss (query->keys, hard negatives as extra keys) and
    fused_symmetric_contrastive_loss with exclusion lists, against the dense cross-entropy."""
    d = _fp64(global_batch())
    exclude = global_exclude("both")
    keys = torch.cat([d["k"], d["h"]])
    key_ids = torch.cat([d["item_ids"], d["hn_ids"]])
    one = fused_contrastive_loss(d["q"], keys, d["scale"], key_ids=key_ids, block_size=block, exclude_ids=exclude)
    ref = reference_loss(d["q"], d["k"], d["scale"], d["item_ids"], None, d["h"], d["hn_ids"], symmetric=False,
                         exclude=exclude)
    torch.testing.assert_close(one, ref, **EXACT)
    for got, want in zip(_grads(one, [d["q"], d["k"], d["h"]]), _grads(ref, [d["q"], d["k"], d["h"]])):
        torch.testing.assert_close(got, want, **EXACT)
    # Distinct item ids here: this kernel's duplicate-item half masks in the query->key
    # direction only, the reference's in both; the lists still name items 7, 8, 9 and 11.
    unique = torch.tensor([7, 8, -1, 9, 12, 13, 11, 14])
    sym = fused_symmetric_contrastive_loss(d["q"], d["k"], d["scale"], key_ids=unique, block_size=block,
                                           exclude_ids=exclude)
    ref = reference_loss(d["q"], d["k"], d["scale"], unique, None, symmetric=True, exclude=exclude)
    torch.testing.assert_close(sym, ref, **EXACT)
    for got, want in zip(_grads(sym, [d["q"], d["k"]]), _grads(ref, [d["q"], d["k"]])):
        torch.testing.assert_close(got, want, **EXACT)


# --- Distillation ---------------------------------------------------------------------------

def _distill_inputs():
    d = _fp64(global_batch())
    return d, PairLabels(item_ids=d["item_ids"], query_ids=d["query_ids"], weights=d["weights"],
                         hard_negative_ids=d["hn_ids"], hard_negative_owner=OWNERS, teacher_scores=TEACHER.double())


@pytest.mark.unit
@pytest.mark.parametrize("symmetric", [False, True])
def test_distillation_term_is_the_weighted_kl_with_its_gradient(symmetric):
    """loss(distill_weight) - loss(0) = weight x the pair-by-pair KL reference, in value and in
    gradient (query, items, hard negatives, logit scale), with pairs lacking scores or
    negatives contributing nothing."""
    d, labels = _distill_inputs()
    tensors = [d["q"], d["k"], d["h"], d["scale"]]
    with_kl = ContrastiveLoss(symmetric, False, distill_weight=DISTILL_WEIGHT, distill_temperature=DISTILL_T)
    diff = with_kl(d["q"], d["k"], d["scale"], labels, d["h"]) - ContrastiveLoss(symmetric, False)(
        d["q"], d["k"], d["scale"], labels, d["h"])
    ref = DISTILL_WEIGHT * distill_reference(d["q"], d["k"], d["h"], d["scale"], OWNERS, TEACHER.double(),
                                             d["weights"], DISTILL_T)
    assert float(ref.detach()) > 1e-3  # not vacuous
    torch.testing.assert_close(diff, ref, **EXACT)
    for got, want in zip(_grads(diff, tensors), _grads(ref, tensors)):
        torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.unit
def test_distillation_gradcheck():
    d, labels = _distill_inputs()
    loss_fn = ContrastiveLoss(True, False, block_size=3, distill_weight=DISTILL_WEIGHT, distill_temperature=DISTILL_T)
    labels.exclude_ids = global_exclude("both")

    def f(q, k, h, s):
        return loss_fn(q, k, s, labels, h)

    assert torch.autograd.gradcheck(f, (d["q"], d["k"], d["h"], d["scale"]))


@pytest.mark.unit
def test_distillation_config_is_validated():
    from clicktower.launcher.engine.config import load_config
    from clicktower.launcher.errors import ConfigError

    assert LossConfig().distill_weight == 0.0 and LossConfig().distill_temperature == 1.0
    loss = ContrastiveLoss.from_config(LossConfig(distill_weight=0.5, distill_temperature=0.1))
    assert (loss.distill_weight, loss.distill_temperature) == (0.5, 0.1)
    with pytest.raises(ConfigError, match="loss.distill_weight"):
        load_config(TINY_CONFIG, ["loss.distill_weight=-1"])
    with pytest.raises(ConfigError, match="loss.distill_temperature"):
        load_config(TINY_CONFIG, ["loss.distill_temperature=0"])


# --- Two gloo ranks ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rank_results():
    return run_ranks(exclusion_loss_worker, WORLD)


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}-hn{}-{}-gather{}-{}".format(
    "sym" if c[0] else "one", int(c[1]), c[2], int(c[3]), c[4]))
def test_exclusions_across_ranks_against_single_process(rank_results, case):
    """The gradient contract of test_distributed_loss with exclusion lists naming the other
    rank's items and hard negatives: the mean of the per-rank losses is the global loss, each
    rank's embeddings get W x its gradient, the logit scale's averages to it."""
    assert_gradient_contract([r[case] for r in rank_results], case, case_reference, TOL)


@pytest.mark.multiprocess
@pytest.mark.parametrize("gather", [False, True])
def test_train_step_with_hard_negatives_exclusions_and_distillation_plain_and_grad_cache(gather):
    """The real TrainStep.forward_backward under DDP on 2 ranks, hard negatives (2 and 1 per
    rank), exclusion lists and teacher scores in the batch: unchunked and GradCache in chunks
    of 2 (rank 1's single negative leaves a chunk without any) both give the DDP-averaged
    gradient of the single-process loss."""
    results = run_ranks(exclusion_step_worker, WORLD, gather)
    grads, loss = step_reference()
    for chunk in (None, 2):
        torch.testing.assert_close(sum(r[chunk]["loss"] for r in results) / WORLD, loss, **TOL)
        for r in results:
            for name, grad in grads.items():
                torch.testing.assert_close(r[chunk][name], grad, **TOL, msg=f"chunk {chunk} {name}")
