"""Per-rank bodies for the 2-process tests of per-sample exclusions (``exclude_ids``),
distillation and GradCache with hard negatives, and their dense references.

The global batch is ``dist_workers.global_batch``'s, plus exclusion lists that name items of
the other rank, hard negatives of both ranks, the row's own positive (which stays) and
unknown ids; rank 0 lists up to 2 ids per row, rank 1 one (or none at all: ``rank1_none``),
so the loss must agree across ranks on a width it learns from them.
"""
from __future__ import annotations

import itertools

import torch

from clicktower.data.batch import PairBatch, PairLabels
from clicktower.modeling.losses import ContrastiveLoss
from dist_workers import (BLOCK, DIM, HN_SIZES, MASKS, SIZES, StepAccelerator, TinyTowers, global_batch,
                          local_slice, reference_loss)

# Rank 0's rows (global 0-2) list 2 ids, rank 1's (global 3-7) one. Item ids of the global
# batch: [7, 8, -1, 9, 7, 9, 11, 7]; hard negatives: [8, -1, 9].
EXCLUDE_RANK0 = torch.tensor([[11, 9], [7, -1], [8, 9]])
EXCLUDE_RANK1 = torch.tensor([[8], [-1], [9], [7], [11]])
# Global pair of each hard negative (rank 0's two: pairs 0 and 2; rank 1's: its pair 1).
OWNERS = torch.tensor([0, 2, 4])
NAN = float("nan")
# Teacher scores of each pair's positive and its (at most one) hard negative.
TEACHER = torch.tensor([[2.0, 0.5], [1.0, NAN], [0.2, 1.5], [1.0, NAN], [3.0, -1.0], [NAN, NAN],
                        [0.0, NAN], [1.0, NAN]])
DISTILL_WEIGHT, DISTILL_T = 0.7, 2.0

# (symmetric, hard negatives, masks, gather_queries, variant).
CASES = [(sym, hn, masks, gather, variant)
         for sym, hn, masks, gather, variant in itertools.product(
             (False, True), (False, True), ("none", "both"), (False, True), ("both", "rank1_none"))
         if sym or not gather]


def global_exclude(variant: str) -> torch.Tensor:
    """[8, 2] exclusion lists of the global batch as the reference sees them."""
    out = torch.full((sum(SIZES), 2), -1, dtype=torch.long)
    out[:SIZES[0]] = EXCLUDE_RANK0
    if variant == "both":
        out[SIZES[0]:, :1] = EXCLUDE_RANK1
    return out


def local_exclude(rank: int, variant: str) -> torch.Tensor | None:
    if rank == 0:
        return EXCLUDE_RANK0
    return EXCLUDE_RANK1 if variant == "both" else None


def case_reference(data: dict, case, q, k, s, h) -> torch.Tensor:
    """``reference_loss`` with the case's exclusions on the global batch."""
    symmetric, with_hn, masks, _, variant = case
    items, queries = MASKS[masks]
    return reference_loss(q, k, s, data["item_ids"], data["query_ids"] if queries else None,
                          h if with_hn else None, data["hn_ids"] if with_hn else None, data["weights"],
                          symmetric, exclude=global_exclude(variant), mask_items=items)


def exclusion_loss_worker(rank: int, world: int) -> dict:
    """Per-rank loss and gradients of every CASES entry."""
    data = global_batch()
    out = {}
    for case in CASES:
        symmetric, with_hn, masks, gather, variant = case
        q, k = (local_slice(data[n], SIZES, rank).clone().requires_grad_() for n in ("q", "k"))
        h = local_slice(data["h"], HN_SIZES, rank).clone().requires_grad_()
        s = data["scale"].clone().requires_grad_()
        labels = PairLabels(**{n: local_slice(data[n], SIZES, rank) for n in ("item_ids", "query_ids", "weights")},
                            exclude_ids=local_exclude(rank, variant),
                            hard_negative_ids=local_slice(data["hn_ids"], HN_SIZES, rank) if with_hn else None)
        loss_fn = ContrastiveLoss(symmetric, True, gather, *MASKS[masks], block_size=BLOCK, rank=rank, world_size=world)
        loss = loss_fn(q, k, s, labels, h if with_hn else None)
        loss.backward()
        out[case] = {"loss": loss.detach(), "q": q.grad, "k": k.grad, "s": s.grad, "h": h.grad if with_hn else None}
    return out


def distill_reference(q, k, h, s, owners, teacher, weights, temperature: float) -> torch.Tensor:
    """sum_a w_a KL(softmax(teacher_a / T) || softmax(s <q_a, candidates_a>)) / sum_a w_a, the
    candidates of pair a being its positive and its own hard negatives where the teacher has
    a score; written out pair by pair."""
    total = q.new_zeros(())
    for a in range(q.shape[0]):
        cands = [k[a]] + [h[j] for j in range(h.shape[0]) if int(owners[j]) == a]
        scores = teacher[a, :len(cands)]
        keep = [i for i in range(len(cands)) if not torch.isnan(scores[i])]
        if len(keep) < 2:
            continue
        student = torch.stack([s * (q[a] * cands[i]).sum() for i in keep])
        p_teacher = torch.softmax(scores[keep].to(q.dtype) / temperature, 0)
        total = total + weights[a] * (p_teacher * (p_teacher.log() - torch.log_softmax(student, 0))).sum()
    return total / weights.sum()


def step_batch(rank: int) -> PairBatch:
    """Rank ``rank``'s training batch of ``global_batch(2)`` for TinyTowers: the item rows are
    the pairs' items followed by the rank's hard negatives, as the loader lays them out."""
    data = global_batch(2)
    part = {n: local_slice(data[n], SIZES, rank) for n in ("q", "k", "item_ids", "query_ids", "weights")}
    h = local_slice(data["h"], HN_SIZES, rank)
    items = torch.cat([part["k"], h])
    owners = local_slice(OWNERS, HN_SIZES, rank) - sum(SIZES[:rank])
    keys = [f"r{rank}p{i}" for i in range(SIZES[rank])]
    tokens = {"query_input_ids": part["q"], "query_attention_mask": torch.ones(SIZES[rank], DIM),
              "item_input_ids": items, "item_attention_mask": torch.ones(items.shape[0], DIM)}
    labels = PairLabels(item_ids=part["item_ids"], query_ids=part["query_ids"], weights=part["weights"],
                        exclude_ids=local_exclude(rank, "both"),
                        hard_negative_ids=local_slice(data["hn_ids"], HN_SIZES, rank), hard_negative_owner=owners,
                        teacher_scores=local_slice(TEACHER, SIZES, rank))
    return PairBatch(keys=keys, queries=keys, items=keys, labels=labels, tokens=tokens)


def exclusion_step_worker(rank: int, world: int, gather: bool) -> dict:
    """``TrainStep.forward_backward`` with hard negatives, exclusions and distillation, plainly
    and with GradCache (chunks of 2; the negatives chunked alongside): DDP-averaged gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from clicktower.launcher.engine.optim import Optimization
    from clicktower.launcher.engine.step import TrainStep

    batch = step_batch(rank)
    out = {}
    for chunk in (None, 2):
        model = DDP(TinyTowers())
        loss_fn = ContrastiveLoss(True, True, gather, block_size=BLOCK, distill_weight=DISTILL_WEIGHT,
                                  distill_temperature=DISTILL_T, rank=rank, world_size=world)
        step = TrainStep(StepAccelerator(world), model, loss_fn, Optimization(None, None, None), chunk)
        loss = step.forward_backward(batch)
        out[chunk] = {name: p.grad for name, p in model.module.named_parameters()} | {"loss": loss}
    return out


def step_reference() -> tuple[dict, torch.Tensor]:
    """TinyTowers' gradient of the single-process loss (contrastive with exclusions, plus
    distillation) on the whole global batch of ``step_batch``."""
    data = global_batch(2)
    model = TinyTowers()
    emb_q, emb_kh, scale = model(data["q"], None, torch.cat([data["k"], data["h"]]), None)
    n = data["q"].shape[0]
    emb_k, emb_h = emb_kh[:n], emb_kh[n:]
    loss = reference_loss(emb_q, emb_k, scale, data["item_ids"], data["query_ids"], emb_h, data["hn_ids"],
                          data["weights"], exclude=global_exclude("both"))
    loss = loss + DISTILL_WEIGHT * distill_reference(emb_q, emb_k, emb_h, scale, OWNERS, TEACHER,
                                                     data["weights"], DISTILL_T)
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}, loss.detach()
