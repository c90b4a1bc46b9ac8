"""Cross-device NT-Xent on 2 real gloo ranks against the single-process dense definition.

The gradient contract (the one place distributed gradients are scaled is the loss): the mean
over ranks of the per-rank losses is the single-process loss over the concatenated global
batch, and the gradient each rank gets for its local embeddings is world_size x the gradient
of that loss, so that DDP's averaging gives exactly the single-process update. Uneven local
batches, a popular item and a repeated query text within and across ranks (the false-negative
rule in both directions, each half alone and both), hard negatives with ids, sample weights,
symmetric on and off, both ways of seeing the other ranks' queries (gather_queries), and the
trainer's GradCache path.
"""
from __future__ import annotations

import pytest
import torch

from dist_harness import run_ranks
from dist_workers import (CASES, MASKS, SIZES, TinyTowers, assert_gradient_contract, case_reference, ddp_worker,
                          global_batch, local_slice, loss_worker, reference_loss, step_worker)

pytestmark = pytest.mark.multiprocess

WORLD = 2
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def rank_results():
    return run_ranks(loss_worker, WORLD)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}-hn{}-{}-gather{}-w{}".format(
    "sym" if c[0] else "one", int(c[1]), c[2], int(c[3]), int(c[4])))
def test_gradient_contract_against_single_process(rank_results, case):
    assert_gradient_contract([r[case] for r in rank_results], case, case_reference, TOL)

def test_cases_exercise_every_mask():
    """The batch really holds what the cases claim: each half of the rule masks something in
    both directions that the other half does not, so a case applying the wrong rule fails."""
    data = global_batch()
    q, k, s = data["q"], data["k"], data["scale"]
    losses = {m: reference_loss(q, k, s, data["item_ids"] if a else None, data["query_ids"] if b else None)
              for m, (a, b) in MASKS.items()}
    assert len({round(float(v), 6) for v in losses.values()}) == 4, losses
    for sym in (False, True):
        one_way = {m: reference_loss(q, k, s, data["item_ids"] if a else None, data["query_ids"] if b else None,
                                     symmetric=sym) for m, (a, b) in MASKS.items()}
        assert len({round(float(v), 6) for v in one_way.values()}) == 4, (sym, one_way)


def test_local_only_when_cross_device_is_off(rank_results):
    data = global_batch()
    for rank, r in enumerate(rank_results):
        q, k = local_slice(data["q"], SIZES, rank), local_slice(data["k"], SIZES, rank)
        torch.testing.assert_close(r["local_only"], reference_loss(q, k, data["scale"]), **TOL)


def _reference_gradients(data: dict, weighted: bool, symmetric: bool = True) -> tuple[dict, torch.Tensor]:
    """TinyTowers' gradient of the single-process reference loss on the whole global batch."""
    model = TinyTowers()
    emb_q, emb_k, scale = model(data["q"], None, data["k"], None)
    loss = reference_loss(emb_q, emb_k, scale, data["item_ids"], data["query_ids"],
                          weights=data["weights"] if weighted else None, symmetric=symmetric)
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}, loss.detach()


@pytest.mark.parametrize("symmetric,gather,weighted", [(False, False, True), (True, False, False),
                                                       (True, False, True), (True, True, True)])
def test_ddp_update_equals_single_process_update(symmetric, gather, weighted):
    """W ranks x uneven local batches under DDP == one process with the whole batch, weights
    and both mask halves included: DDP's averaged gradient on every rank is the
    single-process gradient, and the mean of the per-rank losses the single-process loss."""
    results = run_ranks(ddp_worker, WORLD, symmetric, gather, weighted)
    grads, loss = _reference_gradients(global_batch(1), weighted, symmetric)
    torch.testing.assert_close(sum(r["loss"] for r in results) / WORLD, loss, **TOL)
    for r in results:  # DDP leaves the same averaged gradient on every rank
        for name, grad in grads.items():
            torch.testing.assert_close(r[name], grad, **TOL, msg=name)


@pytest.mark.parametrize("gather", [False, True])
def test_train_step_passes_weights_and_grad_cache_matches(gather):
    """The real TrainStep.forward_backward (plain and GradCache in chunks of 2, the cached
    embeddings going through the same loss) on a weighted batch with repeated items and
    queries: both give the DDP-averaged gradient of the single-process weighted loss."""
    results = run_ranks(step_worker, WORLD, gather)
    grads, loss = _reference_gradients(global_batch(2), weighted=True)
    for chunk in (None, 2):
        torch.testing.assert_close(sum(r[chunk]["loss"] for r in results) / WORLD, loss, **TOL)
        for r in results:
            for name, grad in grads.items():
                torch.testing.assert_close(r[chunk][name], grad, **TOL, msg=f"chunk {chunk} {name}")
