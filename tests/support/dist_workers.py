"""Per-rank bodies for the 2-process gloo tests (spawned by dist_harness.run_ranks), and the
loss's definition written out densely (``reference_loss``), which the one-process tests use too."""
from __future__ import annotations

import contextlib
import itertools
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from clicktower.data.batch import PairBatch, PairLabels
from clicktower.kernels import gather_with_grad
from clicktower.modeling.losses import ContrastiveLoss

SIZES = (3, 5)          # uneven local batches (the last batch of an epoch)
HN_SIZES = (2, 1)       # uneven hard negatives per rank
DIM = 8
BLOCK = 3               # kernel tiles of 3: several per rank, ragged ones included

# Which halves of the false-negative rule a case applies (the ids are always passed, as the
# trainer passes them; the loss's flags decide what they mask).
MASKS = {"none": (False, False), "items": (True, False), "queries": (False, True), "both": (True, True)}
# (symmetric, hard negatives, masks, gather_queries, weighted): gather_queries only matters
# for the symmetric loss.
CASES = [(sym, hn, masks, gather, weighted)
         for sym, hn, masks, gather, weighted in itertools.product((False, True), (False, True), MASKS,
                                                                   (False, True), (False, True))
         if sym or not gather]


def reference_loss(q, k, s, item_ids=None, query_ids=None, h=None, hn_ids=None, weights=None,
                   symmetric=True, exclude=None, mask_items=True) -> torch.Tensor:
    """The loss by its definition, on dense logits.

    For an anchor pair a and a candidate pair c != a, c leaves a's denominator -- query a
    against item c, and item a against query c -- when ``item_ids[c] == item_ids[a]`` or
    ``query_ids[c] == query_ids[a]``; id -1 never matches; None leaves that half out. Hard
    negative j leaves query a's denominator when ``hn_ids[j] == item_ids[a]``. The loss is
    ``sum_a w_a CE_a / sum_a w_a`` (w = 1 by default), CE_a symmetric: the mean of pair a's
    query->item and item->query cross-entropies. ``exclude`` ([n, E] item ids, -1 padded):
    item c (c != a) and hard negative j leave query a's denominator when their id is in a's
    list, and query c leaves item a's when ``item_ids[a]`` is in c's list. ``mask_items=False``
    leaves the item half of the rule out but still reads ``item_ids`` for the exclusions.
    """
    n = q.shape[0]
    false_negative = torch.zeros(n, n, dtype=torch.bool)  # [anchor a, candidate c]
    for ids in (item_ids if mask_items else None, query_ids):
        if ids is not None:
            false_negative |= (ids[None, :] == ids[:, None]) & (ids[:, None] != -1)
    listed = torch.zeros(n, n, dtype=torch.bool)  # [query a, item c]: a's list names c's item
    if exclude is not None:
        listed = (exclude[:, :, None] == item_ids[None, None, :]).any(1) & (item_ids[None, :] != -1)
        listed &= ~torch.eye(n, dtype=torch.bool)
    false_negative &= ~torch.eye(n, dtype=torch.bool)
    to_items = (s * q @ k.T).masked_fill(false_negative | listed, float("-inf"))  # query a vs item c
    if h is not None:
        to_hard = s * q @ h.T
        if mask_items and item_ids is not None and hn_ids is not None:
            to_hard = to_hard.masked_fill((hn_ids[None, :] == item_ids[:, None]) & (item_ids[:, None] != -1),
                                          float("-inf"))
        if exclude is not None:
            to_hard = to_hard.masked_fill((exclude[:, :, None] == hn_ids[None, None, :]).any(1)
                                          & (hn_ids[None, :] != -1), float("-inf"))
        to_items = torch.cat([to_items, to_hard], 1)
    per_pair = F.cross_entropy(to_items, torch.arange(n), reduction="none")
    if symmetric:
        to_queries = (s * k @ q.T).masked_fill(false_negative | listed.T, float("-inf"))  # item a vs query c
        per_pair = 0.5 * (per_pair + F.cross_entropy(to_queries, torch.arange(n), reduction="none"))
    w = torch.ones(n, dtype=per_pair.dtype) if weights is None else weights.to(per_pair.dtype)
    return (w * per_pair).sum() / w.sum()


def global_batch(seed: int = 0) -> dict:
    """The global batch every rank builds identically; rank r holds its SIZES[r] slice."""
    g = torch.Generator().manual_seed(seed)
    n, h = sum(SIZES), sum(HN_SIZES)
    return {
        "q": F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1).float(),
        "k": F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1).float(),
        "h": F.normalize(torch.randn(h, DIM, generator=g, dtype=torch.float64), dim=-1).float(),
        # A popular product: 7 clicked on both ranks (rows 0, 4 and 7); 9 twice on rank 1;
        # -1 = unknown.
        "item_ids": torch.tensor([7, 8, -1, 9, 7, 9, 11, 7]),
        # A repeated query text: 3 on both ranks (rows 1 and 5) for different products; rows 4
        # and 7 repeat query 5 AND product 7 (both halves at once).
        "query_ids": torch.tensor([1, 3, 2, 4, 5, 3, -1, 5]),
        # Hard negative 0 is product 8 (masked for row 1), hard negative 2 is product 9.
        "hn_ids": torch.tensor([8, -1, 9]),
        "weights": torch.tensor([1.0, 0.5, 2.0, 1.5, 0.25, 1.0, 3.0, 0.75]),
        "scale": torch.tensor(7.5),
    }


def local_slice(x: torch.Tensor, sizes, rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]


def assert_gradient_contract(per_rank: list[dict], case, reference, tol: dict) -> None:
    """The distributed loss-scaling contract of one case, against the single-process loss of
    the global batch.

    Args:
        per_rank: each rank's ``{"loss", "q", "k", "h", "s"}`` for this case (from a worker).
        case: the case tuple (``case[1]``: hard negatives present).
        reference: ``reference(data, case, q, k, s, h)``, the global-batch loss.
        tol: ``torch.testing.assert_close`` tolerances.
    """
    data = global_batch()
    q, k, h = (data[name].clone().requires_grad_() for name in ("q", "k", "h"))
    s = data["scale"].clone().requires_grad_()
    ref = reference(data, case, q, k, s, h)
    ref.backward()
    world = len(per_rank)
    # The mean of the per-rank losses (what the trainer logs) is the global-batch loss...
    torch.testing.assert_close(sum(r["loss"] for r in per_rank) / world, ref.detach(), **tol)
    for rank, r in enumerate(per_rank):
        # ...each rank's local embeddings get W x the single-process gradient...
        torch.testing.assert_close(r["q"], world * local_slice(q.grad, SIZES, rank), **tol)
        torch.testing.assert_close(r["k"], world * local_slice(k.grad, SIZES, rank), **tol)
        if case[1]:
            torch.testing.assert_close(r["h"], world * local_slice(h.grad, HN_SIZES, rank), **tol)
    # ...and a replicated parameter (the logit scale) averaged over ranks, as DDP does. (Without
    # gathered queries each rank differentiates the column sums of ITS queries for all items,
    # not its items' full rows: only the sum over ranks matches.)
    torch.testing.assert_close(sum(r["s"] for r in per_rank) / world, s.grad, **tol)


def case_reference(data: dict, case, q, k, s, h) -> torch.Tensor:
    """``reference_loss`` of one CASES entry on the global batch.

    Args:
        data: ``global_batch()``.
        case: (symmetric, hard negatives, masks, gather_queries, weighted).
        q, k, s, h: the (global) tensors to differentiate.
    """
    symmetric, with_hn, masks, _, weighted = case
    items, queries = MASKS[masks]
    return reference_loss(q, k, s, data["item_ids"] if items else None, data["query_ids"] if queries else None,
                          h if with_hn else None, data["hn_ids"] if with_hn else None,
                          data["weights"] if weighted else None, symmetric)


def loss_worker(rank: int, world: int) -> dict:
    """Per-rank loss and gradients for every CASES entry."""
    data = global_batch()
    out = {}
    for case in CASES:
        symmetric, with_hn, masks, gather, weighted = case
        q, k = (local_slice(data[n], SIZES, rank).clone().requires_grad_() for n in ("q", "k"))
        h = local_slice(data["h"], HN_SIZES, rank).clone().requires_grad_()
        s = data["scale"].clone().requires_grad_()
        labels = PairLabels()
        if masks != "none":
            labels = PairLabels(**{n: local_slice(data[n], SIZES, rank) for n in ("item_ids", "query_ids")})
            if with_hn:
                labels.hard_negative_ids = local_slice(data["hn_ids"], HN_SIZES, rank)
        if weighted:
            labels.weights = local_slice(data["weights"], SIZES, rank)
        loss_fn = ContrastiveLoss(symmetric, True, gather, *MASKS[masks], block_size=BLOCK, rank=rank, world_size=world)
        loss = loss_fn(q, k, s, labels, h if with_hn else None)
        loss.backward()
        out[case] = {"loss": loss.detach(), "q": q.grad, "k": k.grad, "s": s.grad, "h": h.grad if with_hn else None}
    # cross_device=False under a process group: the local in-batch loss, no collectives.
    q, k = local_slice(data["q"], SIZES, rank), local_slice(data["k"], SIZES, rank)
    out["local_only"] = ContrastiveLoss(symmetric=True, cross_device=False)(q, k, data["scale"])
    return out


def gather_worker(rank: int, world: int) -> dict:
    """gather_with_grad on uneven slices: values in rank order, gradient summed over ranks."""
    sizes = (2, 3)
    full = torch.arange(sum(sizes) * 2, dtype=torch.float32).view(-1, 2)
    x = local_slice(full, sizes, rank).clone().requires_grad_()
    gathered = gather_with_grad(x)
    weights = torch.full_like(gathered, float(rank + 1)) * torch.arange(1, sum(sizes) + 1)[:, None]
    (gathered * weights).sum().backward()
    ids = gather_with_grad(local_slice(torch.tensor([10, 11, 12, 13, 14]), sizes, rank))
    return {"gathered": gathered.detach(), "grad": x.grad, "ids": ids}


class TinyTowers(torch.nn.Module):
    """Both towers one linear map of the input features (the 'input ids' of the batch), unit
    norm outputs, a learnt logit scale: the TwoTower interface TrainStep calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(DIM, DIM)
        self.log_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, query_input_ids, query_attention_mask, item_input_ids, item_attention_mask):
        # One call embeds both sides, as TwoTower does, so DDP sees each parameter once.
        n = query_input_ids.shape[0]
        emb = F.normalize(self.proj(torch.cat([query_input_ids, item_input_ids])), dim=-1)
        return emb[:n], emb[n:], self.log_scale.exp()


def ddp_worker(rank: int, world: int, symmetric: bool, gather: bool, weighted: bool) -> dict:
    """TinyTowers under DDP on uneven local batches, all id masks on: its averaged gradient."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    data = global_batch(1)
    model = DDP(TinyTowers())
    part = {n: local_slice(data[n], SIZES, rank) for n in ("q", "k", "item_ids", "query_ids", "weights")}
    emb_q, emb_k, scale = model(part["q"], None, part["k"], None)
    loss = ContrastiveLoss(symmetric, True, gather, block_size=BLOCK, rank=rank, world_size=world)(
        emb_q, emb_k, scale, PairLabels(item_ids=part["item_ids"], query_ids=part["query_ids"],
                                        weights=part["weights"] if weighted else None))
    loss.backward()
    return {name: p.grad for name, p in model.module.named_parameters()} | {"loss": loss.detach()}


class StepAccelerator:
    """The part of accelerate's Accelerator that ``TrainStep.forward_backward`` uses, for a
    DDP model on the gloo group of dist_harness (no accelerate state involved)."""

    def __init__(self, world: int) -> None:
        self.device, self.num_processes, self.gradient_accumulation_steps = torch.device("cpu"), world, 1
        self.state = SimpleNamespace(deepspeed_plugin=None)

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self, model):
        return model.no_sync()

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "max", reduction
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out


def step_worker(rank: int, world: int, gather: bool, **loss_options) -> dict:
    """``TrainStep.forward_backward`` on a weighted batch with repeated items and queries,
    plainly and with GradCache (chunks of 2): the DDP-averaged gradients and the local loss.
    ``loss_options`` go to ``ContrastiveLoss`` (``matryoshka_dims``, ...)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from clicktower.launcher.engine.optim import Optimization
    from clicktower.launcher.engine.step import TrainStep

    data = global_batch(2)
    part = {n: local_slice(data[n], SIZES, rank) for n in ("q", "k", "item_ids", "query_ids", "weights")}
    ones = torch.ones(SIZES[rank], DIM)
    keys = [f"r{rank}p{i}" for i in range(SIZES[rank])]
    batch = PairBatch(keys=keys, queries=keys, items=keys,
                      labels=PairLabels(item_ids=part["item_ids"], query_ids=part["query_ids"], weights=part["weights"]),
                      tokens={"query_input_ids": part["q"], "query_attention_mask": ones,
                              "item_input_ids": part["k"], "item_attention_mask": ones})
    out = {}
    for chunk in (None, 2):
        model = DDP(TinyTowers())
        loss_fn = ContrastiveLoss(True, True, gather, block_size=BLOCK, rank=rank, world_size=world,
                                  **loss_options)
        step = TrainStep(StepAccelerator(world), model, loss_fn, Optimization(None, None, None), chunk)
        loss = step.forward_backward(batch)
        out[chunk] = {name: p.grad for name, p in model.module.named_parameters()} | {"loss": loss}
    return out


def short_gradcache_worker(rank: int, world: int) -> dict:
    """``TrainStep.forward_backward`` with GradCache in chunks of 1 pair on the uneven local
    batches of ``SIZES`` (3 and 5 pairs): the step runs 5 chunks, more than rank 0's pairs.
    Returns what this rank raised (type name and message), or that it went on."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from clicktower.launcher.engine.optim import Optimization
    from clicktower.launcher.engine.step import TrainStep

    data = global_batch(2)
    part = {n: local_slice(data[n], SIZES, rank) for n in ("q", "k", "item_ids", "query_ids")}
    ones = torch.ones(SIZES[rank], DIM)
    keys = [f"r{rank}p{i}" for i in range(SIZES[rank])]
    batch = PairBatch(keys=keys, queries=keys, items=keys,
                      labels=PairLabels(item_ids=part["item_ids"], query_ids=part["query_ids"]),
                      tokens={"query_input_ids": part["q"], "query_attention_mask": ones,
                              "item_input_ids": part["k"], "item_attention_mask": ones})
    loss_fn = ContrastiveLoss(True, True, False, block_size=BLOCK, rank=rank, world_size=world)
    step = TrainStep(StepAccelerator(world), DDP(TinyTowers()), loss_fn, Optimization(None, None, None), 1)
    try:
        step.forward_backward(batch)
    except Exception as exc:  # noqa: BLE001 - what each rank raised is the result
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None}
