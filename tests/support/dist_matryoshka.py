"""Per-rank bodies for the 2-process Matryoshka tests (``loss.matryoshka_dims``) and their
dense reference: the weighted sum, over the prefixes, of ``reference_loss`` on each prefix
re-normalised (the whole embedding as it is)."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from clicktower.data.batch import PairLabels
from clicktower.modeling.losses import ContrastiveLoss
from dist_exclude import global_exclude, local_exclude
from dist_workers import BLOCK, DIM, HN_SIZES, SIZES, global_batch, local_slice, reference_loss, step_worker

DIMS, WEIGHTS = [DIM, 4, 2], [1.0, 0.5, 2.0]
# (symmetric, hard negatives, gather_queries, exclusions): ids and weights always on.
CASES = [c for c in itertools.product((False, True), (False, True), (False, True), (False, True)) if c[0] or not c[2]]


def prefix(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if dim == x.shape[1] else F.normalize(x[:, :dim], dim=-1)


def matryoshka_reference(data: dict, case, q, k, s, h, dims=DIMS, weights=WEIGHTS) -> torch.Tensor:
    """sum_d w_d * (the dense loss of the global batch on prefix d)."""
    symmetric, with_hn, _, excl = case
    total = 0.0
    for dim, weight in zip(dims, weights):
        total = total + weight * reference_loss(
            prefix(q, dim), prefix(k, dim), s, data["item_ids"], data["query_ids"],
            prefix(h, dim) if with_hn else None, data["hn_ids"] if with_hn else None, data["weights"], symmetric,
            exclude=global_exclude("both") if excl else None)
    return total


def case_labels(data: dict, rank: int, world: int, with_hn: bool, excl: bool) -> PairLabels:
    part = (lambda n: local_slice(data[n], SIZES, rank)) if world > 1 else (lambda n: data[n])
    return PairLabels(item_ids=part("item_ids"), query_ids=part("query_ids"), weights=part("weights"),
                      exclude_ids=(local_exclude(rank, "both") if world > 1 else global_exclude("both")) if excl else None,
                      hard_negative_ids=(local_slice(data["hn_ids"], HN_SIZES, rank) if world > 1 else data["hn_ids"])
                      if with_hn else None)


def matryoshka_loss_worker(rank: int, world: int) -> dict:
    """Per-rank Matryoshka loss and gradients of every CASES entry."""
    data = global_batch()
    out = {}
    for case in CASES:
        symmetric, with_hn, gather, excl = case
        q, k = (local_slice(data[n], SIZES, rank).clone().requires_grad_() for n in ("q", "k"))
        h = local_slice(data["h"], HN_SIZES, rank).clone().requires_grad_()
        s = data["scale"].clone().requires_grad_()
        loss_fn = ContrastiveLoss(symmetric, True, gather, block_size=BLOCK, rank=rank, world_size=world,
                                  matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS)
        loss = loss_fn(q, k, s, case_labels(data, rank, world, with_hn, excl), h if with_hn else None)
        loss.backward()
        out[case] = {"loss": loss.detach(), "q": q.grad, "k": k.grad, "s": s.grad, "h": h.grad if with_hn else None}
    return out


def matryoshka_step_worker(rank: int, world: int) -> dict:
    """``TrainStep.forward_backward`` with the Matryoshka loss, plainly and with GradCache
    (chunks of 2): the DDP-averaged gradients and the local loss (``step_worker``'s run)."""
    return step_worker(rank, world, False, matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS)
