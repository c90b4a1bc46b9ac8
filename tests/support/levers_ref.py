"""Dense references for the loss levers (logQ popularity correction, cross-batch memory) and
the per-rank body of their 2-process test.

``levers_reference`` is the loss by its definition on materialised logits: candidates are the
batch's items, then hard negatives, then memory entries; a candidate other than the anchor's
positive leaves the anchor's denominator when it shares the anchor's item id or query id, or
its item id is on the anchor's exclusion list (-1 never matches); with ``*_logp`` every
in-batch and memory negative's logit gets ``-log(K p)`` (K = in-batch + memory candidates),
hard negatives and the positive none; with ``mem_margin`` m a memory candidate also leaves
the anchor's denominator when its dot product with the anchor exceeds ``(1 - m)`` times the
anchor's positive.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _bias(logp, ids, draws):
    b = -(logp(ids) + math.log(draws))
    return torch.where(ids == -1, torch.zeros_like(b), b)


def levers_reference(q, k, s, item_ids, query_ids, *, h=None, hn_ids=None, mem=None, item_logp=None,
                     query_logp=None, symmetric=True, exclude=None, mem_margin=None):
    n, dt = q.shape[0], q.dtype
    emb, c_item, c_query, corrected = [k], [item_ids], [query_ids], [torch.ones(n, dtype=torch.bool)]
    if h is not None:
        emb.append(h), c_item.append(hn_ids), c_query.append(torch.full_like(hn_ids, -1))
        corrected.append(torch.zeros(h.shape[0], dtype=torch.bool))
    if mem is not None:
        emb.append(mem[0].to(dt)), c_item.append(mem[1]), c_query.append(mem[2])
        corrected.append(torch.ones(mem[0].shape[0], dtype=torch.bool))
    emb, c_item, c_query, corrected = (torch.cat(x) for x in (emb, c_item, c_query, corrected))
    same = ((c_item[None, :] == item_ids[:, None]) & (item_ids[:, None] != -1)) \
        | ((c_query[None, :] == query_ids[:, None]) & (query_ids[:, None] != -1))
    ids_same = same[:, :n].clone()  # [anchor a, pair c]: shared item or query id
    if exclude is not None:
        same |= (exclude[:, :, None] == c_item[None, None, :]).any(1) & (c_item[None, :] != -1)
    positive = torch.zeros_like(same)
    positive[torch.arange(n), torch.arange(n)] = True
    if mem is not None and mem_margin is not None:
        dots = (q @ emb.T).detach()
        ceiling = (1 - mem_margin) * (q * k).sum(1).detach()
        in_memory = torch.zeros(emb.shape[0], dtype=torch.bool)
        in_memory[emb.shape[0] - mem[0].shape[0]:] = True
        same |= in_memory[None, :] & (dots > ceiling[:, None])
    logits = s * q @ emb.T
    if item_logp is not None:
        bias = torch.where(corrected, _bias(item_logp, c_item, int(corrected.sum())), torch.zeros(len(c_item), dtype=torch.float64))
        logits = torch.where(positive, logits, logits + bias[None, :].to(dt))
    per_pair = F.cross_entropy(logits.masked_fill(same & ~positive, float("-inf")), torch.arange(n), reduction="none")
    if symmetric:
        pair_same = ids_same & ~positive[:, :n]
        if exclude is not None:  # item a vs query c: c's list names a's item
            listed = (exclude[:, :, None] == item_ids[None, None, :]).any(1) & (item_ids[None, :] != -1)
            pair_same = pair_same | (listed.T & ~positive[:, :n])
        to_queries = s * k @ q.T  # [item a, query c]
        if query_logp is not None:
            qb = _bias(query_logp, query_ids, n)
            to_queries = torch.where(positive[:, :n], to_queries, to_queries + qb[None, :].to(dt))
        item_ce = F.cross_entropy(to_queries.masked_fill(pair_same, float("-inf")), torch.arange(n), reduction="none")
        per_pair = 0.5 * (per_pair + item_ce)
    return per_pair.mean()


def levers_batch(seed: int = 0, n: int = 8, d: int = 6, dtype=torch.float64) -> dict:
    """A global batch with duplicate item and query ids, -1 ids, hard negatives and a memory
    whose entries repeat some of the batch's ids."""
    g = torch.Generator().manual_seed(seed)
    return {
        "q": F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype),
        "k": F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype),
        "h": F.normalize(torch.randn(3, d, generator=g, dtype=torch.float64), dim=1).to(dtype),
        "mem": F.normalize(torch.randn(5, d, generator=g, dtype=torch.float64), dim=1).to(dtype),
        "item_ids": torch.tensor([7, 8, -1, 9, 7, 9, 11, 12])[:n],
        "query_ids": torch.tensor([1, 2, 3, 1, -1, 4, 5, 6])[:n],
        "hn_ids": torch.tensor([8, -1, 13]),
        "mem_item_ids": torch.tensor([7, 20, 21, -1, 12]),
        "mem_query_ids": torch.tensor([30, 2, 31, 32, -1]),
        "exclude": torch.tensor([[20, -1], [-1, -1], [11, 21], [-1, -1], [-1, -1], [7, -1], [-1, -1], [-1, -1]])[:n],
    }


COUNT_ITEMS = (torch.tensor([7, 8, 9, 11, 12, 13, 20, 21]), torch.tensor([40, 3, 10, 1, 2, 5, 25, 7]))
COUNT_QUERIES = (torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([9, 1, 4, 2, 2, 30]))


SIZES, HN_SIZES = (3, 5), (2, 1)
MEMORY_MARGIN = 0.5


def _part(x, sizes, rank):
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]


def levers_config(symmetric: bool, gather: bool):
    from clicktower.modeling.losses import LossConfig

    # The memory filter's margin drops some entries for some rows in these batches (not all).
    return LossConfig(symmetric=symmetric, gather_queries=gather, popularity_correction="logq",
                      popularity_source="streaming", popularity_buckets=64, memory_size=10, memory_warmup_steps=1,
                      memory_filter_margin=MEMORY_MARGIN)


def levers_steps(loss_fn, rank: int, world: int, steps: int = 3) -> list:
    """``steps`` calls of ``loss_fn`` on this rank's slices of ``levers_batch(seed=step)``
    (the whole batch with world 1): each step's loss and gradients of queries, items, hard
    negatives."""
    from clicktower.kernels.labels import PairLabels

    sizes, hn_sizes = (SIZES, HN_SIZES) if world > 1 else ((sum(SIZES),), (sum(HN_SIZES),))
    out = []
    for step in range(steps):
        b = levers_batch(seed=step)
        leaves = [_part(b["q"], sizes, rank), _part(b["k"], sizes, rank), _part(b["h"], hn_sizes, rank)]
        leaves = [x.clone().requires_grad_() for x in leaves]
        labels = PairLabels(item_ids=_part(b["item_ids"], sizes, rank), query_ids=_part(b["query_ids"], sizes, rank),
                            hard_negative_ids=_part(b["hn_ids"], hn_sizes, rank),
                            exclude_ids=_part(b["exclude"], sizes, rank))
        loss = loss_fn(leaves[0], leaves[1], torch.tensor(4.0, dtype=torch.float64), labels, leaves[2])
        out.append([loss.detach()] + list(torch.autograd.grad(loss, leaves)))
    return out


def levers_worker(rank: int, world: int, symmetric: bool, gather: bool) -> dict:
    """One rank of the 2-process test: three steps with streaming logQ and a memory."""
    from clicktower.modeling.losses import ContrastiveLoss

    loss_fn = ContrastiveLoss.from_config(levers_config(symmetric, gather), rank=rank, world_size=world)
    return {"steps": levers_steps(loss_fn, rank, world), "state": loss_fn.state.state_dict()}
