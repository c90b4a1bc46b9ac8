"""Per-rank bodies for the 2-process gloo tests (spawned by dist_harness.run_ranks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from clicktower.kernels import gather_with_grad
from clicktower.modeling.losses import ContrastiveLoss

SIZES = (3, 5)          # uneven local batches (the last batch of an epoch)
HN_SIZES = (2, 1)       # uneven hard negatives per rank
DIM = 8


def global_batch(seed: int = 0) -> dict:
    """The global batch every rank builds identically; rank r holds its SIZES[r] slice."""
    g = torch.Generator().manual_seed(seed)
    n, h = sum(SIZES), sum(HN_SIZES)
    return {
        "q": F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1).float(),
        "k": F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1).float(),
        "h": F.normalize(torch.randn(h, DIM, generator=g, dtype=torch.float64), dim=-1).float(),
        # Product 7 is clicked on both ranks (rows 0 and 4), 9 twice on rank 1; -1 = unknown.
        "item_ids": torch.tensor([7, 8, -1, 9, 7, 9, 11, 12]),
        # Query 3 is issued on both ranks (rows 1 and 5).
        "query_ids": torch.tensor([1, 3, 2, 4, 5, 3, -1, 6]),
        # Hard negative 0 is product 8 (masked for row 1), hard negative 2 is product 9.
        "hn_ids": torch.tensor([8, -1, 9]),
        "scale": torch.tensor(7.5),
    }


def local_slice(x: torch.Tensor, sizes, rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]


def loss_worker(rank: int, world: int) -> dict:
    """Per-rank loss and gradients for each (symmetric, hard negatives, ids) case."""
    data = global_batch()
    out = {}
    for symmetric in (False, True):
        for with_hn in (False, True):
            for with_ids in (False, True):
                q = local_slice(data["q"], SIZES, rank).clone().requires_grad_()
                k = local_slice(data["k"], SIZES, rank).clone().requires_grad_()
                h = local_slice(data["h"], HN_SIZES, rank).clone().requires_grad_()
                s = data["scale"].clone().requires_grad_()
                kwargs = {}
                if with_ids:
                    kwargs = {"item_ids": local_slice(data["item_ids"], SIZES, rank),
                              "query_ids": local_slice(data["query_ids"], SIZES, rank)}
                if with_hn:
                    kwargs["hard_negative_emb"] = h
                    if with_ids:
                        kwargs["hard_negative_ids"] = local_slice(data["hn_ids"], HN_SIZES, rank)
                loss = ContrastiveLoss(symmetric=symmetric, cross_device=True)(q, k, s, **kwargs)
                loss.backward()
                out[(symmetric, with_hn, with_ids)] = {
                    "loss": loss.detach(), "q": q.grad, "k": k.grad, "s": s.grad,
                    "h": h.grad if with_hn else None}
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


def ddp_worker(rank: int, world: int, symmetric: bool) -> dict:
    """A linear 'tower' under DDP on uneven local batches: its averaged parameter gradient."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    data = global_batch(1)
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(DIM, DIM))
    q_in = local_slice(data["q"], SIZES, rank)
    k_in = local_slice(data["k"], SIZES, rank)
    ids = local_slice(data["item_ids"], SIZES, rank)
    # One forward call per step, as TwoTower does, so DDP sees each parameter once.
    emb_q, emb_k = F.normalize(model(torch.cat([q_in, k_in])), dim=-1).split([len(q_in), len(k_in)])
    loss = ContrastiveLoss(symmetric=symmetric, cross_device=True)(emb_q, emb_k, data["scale"], item_ids=ids)
    loss.backward()
    return {"weight": model.module.weight.grad, "bias": model.module.bias.grad, "loss": loss.detach()}
