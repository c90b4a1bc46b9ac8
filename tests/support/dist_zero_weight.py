"""Per-rank body of the 2-process zero-weight loss test (spawned by dist_harness.run_ranks):
``ContrastiveLoss`` over ``dist_workers.global_batch`` with hard negatives and both mask halves,
the sample weights zeroed on every rank (``all_zero``) or on rank 0 only (``rank0_zero``)."""
from __future__ import annotations

import torch

from clicktower.data.batch import PairLabels
from clicktower.modeling.losses import ContrastiveLoss
from dist_workers import BLOCK, HN_SIZES, SIZES, global_batch, local_slice

# (symmetric, gather_queries): one direction, both from one pass, both with gathered queries.
MODES = [(False, False), (True, False), (True, True)]
SCENARIOS = ("all_zero", "rank0_zero")


def scenario_weights(scenario: str) -> torch.Tensor:
    """The global batch's weights in ``scenario`` (every rank builds the same)."""
    weights = global_batch()["weights"].clone()
    if scenario == "all_zero":
        return torch.zeros_like(weights)
    weights[:SIZES[0]] = 0.0
    return weights


def zero_weight_worker(rank: int, world: int) -> dict:
    """Per-rank loss and gradients (q, k, h, s) for every (scenario, mode)."""
    data = global_batch()
    out = {}
    for scenario in SCENARIOS:
        for symmetric, gather in MODES:
            q, k = (local_slice(data[n], SIZES, rank).clone().requires_grad_() for n in ("q", "k"))
            h = local_slice(data["h"], HN_SIZES, rank).clone().requires_grad_()
            s = data["scale"].clone().requires_grad_()
            labels = PairLabels(item_ids=local_slice(data["item_ids"], SIZES, rank),
                                query_ids=local_slice(data["query_ids"], SIZES, rank),
                                hard_negative_ids=local_slice(data["hn_ids"], HN_SIZES, rank),
                                weights=local_slice(scenario_weights(scenario), SIZES, rank))
            loss_fn = ContrastiveLoss(symmetric, True, gather, block_size=BLOCK, rank=rank, world_size=world)
            loss = loss_fn(q, k, s, labels, h)
            loss.backward()
            out[scenario, symmetric, gather] = {"loss": loss.detach(), "q": q.grad, "k": k.grad, "h": h.grad,
                                                "s": s.grad, "total_weight": float(loss_fn.last_total_weight)}
    return out
