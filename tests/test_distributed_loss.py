"""Cross-device NT-Xent on 2 real gloo ranks against a single-process dense reference.

The gradient contract (the one place distributed gradients are scaled is the loss): the
gradient each rank gets for its local embeddings is world_size x the gradient of the
single-process mean loss over the concatenated global batch, so that DDP's averaging gives
exactly the single-process update. Uneven local batches, ids duplicated across ranks, hard
negatives with ids, symmetric on and off.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from dist_harness import run_ranks
from dist_workers import DIM, HN_SIZES, SIZES, ddp_worker, gather_worker, global_batch, local_slice, loss_worker

pytestmark = pytest.mark.multiprocess

WORLD = 2
TOL = dict(rtol=1e-5, atol=1e-5)


def dense_loss(q, k, s, item_ids=None, query_ids=None, h=None, hn_ids=None, symmetric=True):
    """The definition, written out densely: masked logits and F.cross_entropy (mean)."""
    n = q.shape[0]
    keys = k if h is None else torch.cat([k, h])
    logits = s * q @ keys.T
    eye = torch.eye(n, dtype=torch.bool)
    if item_ids is not None:
        key_ids = item_ids if h is None else torch.cat([item_ids, hn_ids if hn_ids is not None
                                                        else torch.full((h.shape[0],), -1)])
        dup = (item_ids[:, None] == key_ids[None, :]) & (item_ids[:, None] != -1)
        dup[:, :n] &= ~eye
        logits = logits.masked_fill(dup, float("-inf"))
    loss = F.cross_entropy(logits, torch.arange(n))
    if not symmetric:
        return loss
    item_logits = s * k @ q.T
    if query_ids is not None:
        dup = (query_ids[:, None] == query_ids[None, :]) & (query_ids[:, None] != -1) & ~eye
        item_logits = item_logits.masked_fill(dup, float("-inf"))
    return 0.5 * (loss + F.cross_entropy(item_logits, torch.arange(n)))


@pytest.fixture(scope="module")
def rank_results():
    return run_ranks(loss_worker, WORLD)


@pytest.mark.parametrize("symmetric,with_hn,with_ids", list(itertools.product((False, True), repeat=3)))
def test_gradient_contract_against_single_process(rank_results, symmetric, with_hn, with_ids):
    data = global_batch()
    q, k, h = (data[name].clone().requires_grad_() for name in ("q", "k", "h"))
    s = data["scale"].clone().requires_grad_()
    ids = {"item_ids": data["item_ids"], "query_ids": data["query_ids"]} if with_ids else {}
    ref = dense_loss(q, k, s, h=h if with_hn else None,
                     hn_ids=data["hn_ids"] if with_hn and with_ids else None, symmetric=symmetric, **ids)
    ref.backward()
    per_rank = [r[(symmetric, with_hn, with_ids)] for r in rank_results]
    # The mean of the per-rank losses (what the trainer logs) is the global-batch loss...
    torch.testing.assert_close(sum(r["loss"] for r in per_rank) / WORLD, ref.detach(), **TOL)
    for rank, r in enumerate(per_rank):
        # ...each rank's local embeddings get W x the single-process gradient...
        torch.testing.assert_close(r["q"], WORLD * local_slice(q.grad, SIZES, rank), **TOL)
        torch.testing.assert_close(r["k"], WORLD * local_slice(k.grad, SIZES, rank), **TOL)
        if with_hn:
            torch.testing.assert_close(r["h"], WORLD * local_slice(h.grad, HN_SIZES, rank), **TOL)
    # ...and a replicated parameter (the logit scale) averaged over ranks, as DDP does.
    torch.testing.assert_close(sum(r["s"] for r in per_rank) / WORLD, s.grad, **TOL)


def test_local_only_when_cross_device_is_off(rank_results):
    data = global_batch()
    for rank, r in enumerate(rank_results):
        q, k = local_slice(data["q"], SIZES, rank), local_slice(data["k"], SIZES, rank)
        torch.testing.assert_close(r["local_only"], dense_loss(q, k, data["scale"]), **TOL)


@pytest.mark.parametrize("symmetric", [False, True])
def test_ddp_update_equals_single_process_update(symmetric):
    """W ranks x uneven local batches under DDP == one process with the whole batch."""
    results = run_ranks(ddp_worker, WORLD, symmetric)
    data = global_batch(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, DIM)
    n = data["q"].shape[0]
    emb_q, emb_k = F.normalize(model(torch.cat([data["q"], data["k"]])), dim=-1).split([n, n])
    dense_loss(emb_q, emb_k, data["scale"], item_ids=data["item_ids"], symmetric=symmetric).backward()
    for r in results:  # DDP leaves the same averaged gradient on every rank
        torch.testing.assert_close(r["weight"], model.weight.grad, **TOL)
        torch.testing.assert_close(r["bias"], model.bias.grad, **TOL)


def column_lse_worker(rank: int, world: int) -> dict:
    """Per rank: loss and gradients of the symmetric loss with the queries gathered and with
    partial column log-sum-exps all-reduced instead, for ids/hard negatives off and on."""
    from clicktower.modeling import losses
    from clicktower.modeling.losses import ContrastiveLoss, LossConfig

    losses._COLUMN_BLOCK = 3  # several tiles over the 8 gathered items, one ragged
    data = global_batch(2)
    out = {}
    for with_ids, with_hn in itertools.product((False, True), repeat=2):
        for gather in (True, False):
            q, k = (local_slice(data[n], SIZES, rank).clone().requires_grad_() for n in ("q", "k"))
            h = local_slice(data["h"], HN_SIZES, rank).clone().requires_grad_()
            s = data["scale"].clone().requires_grad_()
            kwargs = {}
            if with_ids:
                kwargs = {"item_ids": local_slice(data["item_ids"], SIZES, rank),
                          "query_ids": local_slice(data["query_ids"], SIZES, rank)}
            if with_hn:
                kwargs["hard_negative_emb"] = h
            # Built as the trainer builds it, from loss.gather_queries in the config.
            loss_fn = ContrastiveLoss.from_config(LossConfig(gather_queries=gather), distributed=True)
            loss = loss_fn(q, k, s, **kwargs)
            loss.backward()
            out[(with_ids, with_hn, gather)] = {"loss": loss.detach(), "q": q.grad, "k": k.grad, "s": s.grad,
                                                "h": h.grad if with_hn else None}
    return out


@pytest.mark.parametrize("with_ids,with_hn", list(itertools.product((False, True), repeat=2)))
def test_symmetric_loss_without_gathering_queries_equals_the_gathered_one(with_ids, with_hn, column_lse):
    """All-reducing partial column log-sum-exps (O(N) floats) gives the item->query direction
    of the gathered version exactly: values and gradients within 1e-5 on every rank (uneven
    local batches, queries issued on both ranks), and so the same gradient contract; the
    logit scale's gradient summed over ranks."""
    data = global_batch(2)
    q, k = (data[n].clone().requires_grad_() for n in ("q", "k"))
    s = data["scale"].clone().requires_grad_()
    ids = {"item_ids": data["item_ids"], "query_ids": data["query_ids"]} if with_ids else {}
    dense_loss(q, k, s, h=data["h"] if with_hn else None, **ids).backward()
    for rank, r in enumerate(column_lse):
        gathered, reduced = r[(with_ids, with_hn, True)], r[(with_ids, with_hn, False)]
        for name in ("loss", "q", "k", "h"):
            if gathered[name] is not None:
                torch.testing.assert_close(reduced[name], gathered[name], **TOL, msg=f"rank {rank} {name}")
        torch.testing.assert_close(reduced["q"], WORLD * local_slice(q.grad, SIZES, rank), **TOL)
        torch.testing.assert_close(reduced["k"], WORLD * local_slice(k.grad, SIZES, rank), **TOL)
    # The replicated logit scale: each rank now differentiates the column sums of ITS queries
    # for all items, not its items' full rows, so only the sum over ranks (what DDP averages)
    # is the same.
    for gather in (True, False):
        total = sum(r[(with_ids, with_hn, gather)]["s"] for r in column_lse)
        torch.testing.assert_close(total / WORLD, s.grad, **TOL, msg=f"gather_queries={gather}")


@pytest.fixture(scope="module")
def column_lse():
    return run_ranks(column_lse_worker, WORLD)
