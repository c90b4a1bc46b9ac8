"""In-batch NT-Xent against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clicktower.kernels.labels import PairLabels
from clicktower.modeling.losses import ContrastiveLoss

pytestmark = pytest.mark.unit

E = math.e
Q = torch.eye(3)
K = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 1.0]])
# logits[i, j] = Q[i] . K[j]: rows [1, 0, 1], [0, 2, 0], [0, 0, 1]; targets on the diagonal.
ROW_LOSSES = [math.log(2 * E + 1) - 1, math.log(E ** 2 + 2) - 2, math.log(E + 2) - 1]


def test_three_by_three_by_hand():
    loss = ContrastiveLoss(symmetric=False)(Q, K, torch.tensor(1.0))
    assert loss.item() == pytest.approx(sum(ROW_LOSSES) / 3, rel=1e-6)


def test_symmetric_by_hand():
    # Columns [1, 0, 0], [0, 2, 0], [1, 0, 1]: the same three values in another order.
    col_losses = [math.log(E + 2) - 1, math.log(E ** 2 + 2) - 2, math.log(2 * E + 1) - 1]
    loss = ContrastiveLoss(symmetric=True)(Q, K, torch.tensor(1.0))
    assert loss.item() == pytest.approx(0.5 * (sum(ROW_LOSSES) + sum(col_losses)) / 3, rel=1e-6)


def test_duplicate_items_are_not_negatives():
    # Items 0 and 2 are the same product: row 0 loses key 2, row 2 loses key 0.
    ids = torch.tensor([7, 8, 7])
    loss = ContrastiveLoss(symmetric=False)(Q, K, torch.tensor(1.0), PairLabels(item_ids=ids))
    expected = [math.log(E + 1) - 1, ROW_LOSSES[1], math.log(1 + E) - 1]
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    # Id -1 means unknown and never matches.
    unknown = ContrastiveLoss(symmetric=False)(Q, K, torch.tensor(1.0),
                                               PairLabels(item_ids=torch.tensor([-1, 8, -1])))
    assert unknown.item() == pytest.approx(sum(ROW_LOSSES) / 3, rel=1e-6)


def test_temperature_and_hard_negatives_match_cross_entropy():
    torch.manual_seed(0)
    q, k, h = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1), torch.randn(3, 8)
    scale = torch.tensor(20.0)
    loss = ContrastiveLoss(symmetric=False)(q, k, scale, hard_negative_emb=h)
    ref = F.cross_entropy(scale * q @ torch.cat([k, h]).T, torch.arange(5))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_repeated_query_is_masked_in_both_directions_by_hand():
    # Rows 0 and 2 are the same query text (id 5) clicked on different products: query 0
    # loses item 2 and query 2 loses item 0 (query->item), and item 0 loses query 2 and item 2
    # loses query 0 (item->query). Rows of the logits [1, 0, 1], [0, 2, 0], [0, 0, 1]; columns
    # [1, 0, 0], [0, 2, 0], [1, 0, 1]: both directions lose the same entries here.
    masked = [math.log(E + 1) - 1, math.log(E ** 2 + 2) - 2, math.log(1 + E) - 1]
    loss = ContrastiveLoss(symmetric=True)(Q, K, torch.tensor(1.0), PairLabels(query_ids=torch.tensor([5, 6, 5])))
    assert loss.item() == pytest.approx(sum(masked) / 3, rel=1e-6)
    # The same pairs by product id (the item half of the same rule) give the same loss...
    by_item = ContrastiveLoss(symmetric=True)(Q, K, torch.tensor(1.0), PairLabels(item_ids=torch.tensor([7, 8, 7])))
    assert by_item.item() == pytest.approx(loss.item(), rel=1e-6)
    # ...and switching that half off gives the unmasked loss.
    off = ContrastiveLoss(symmetric=True, mask_duplicate_queries=False)(
        Q, K, torch.tensor(1.0), PairLabels(query_ids=torch.tensor([5, 6, 5])))
    col_losses = [math.log(E + 2) - 1, math.log(E ** 2 + 2) - 2, math.log(2 * E + 1) - 1]
    assert off.item() == pytest.approx(0.5 * (sum(ROW_LOSSES) + sum(col_losses)) / 3, rel=1e-6)


def _batch(seed: int = 0, n: int = 10, dim: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"q": F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1),
            "k": F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1),
            "h": F.normalize(torch.randn(3, dim, generator=g, dtype=torch.float64), dim=-1),
            "weights": torch.rand(n, generator=g, dtype=torch.float64) + 0.2, "scale": torch.tensor(6.0)}


# One popular product twice, a repeated query text on different products, and both at once
# (rows 6 and 9 are the same query AND the same product); -1 = unknown.
ID_CASES = {
    "popular_item": (torch.tensor([4, 1, 2, 4, 5, 6, 7, 8, 9, -1]), torch.arange(10) + 100),
    "repeated_query": (torch.arange(10) + 100, torch.tensor([1, 2, 3, 1, 5, 6, 7, 8, -1, 10])),
    "both": (torch.tensor([4, 1, 2, 4, 5, 6, 3, 8, -1, 3]), torch.tensor([1, 2, 3, 1, 5, 6, 7, 8, -1, 7])),
}


@pytest.mark.parametrize("ids", list(ID_CASES))
@pytest.mark.parametrize("halves", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("symmetric,hard", [(False, False), (True, False), (True, True)])
def test_false_negative_rule_matches_dense_definition(ids, halves, symmetric, hard):
    """ContrastiveLoss in one process (tiles of 4: ragged, several per direction) against the
    rule's dense definition, each half of the rule on and off; fp64 loss and gradients."""
    from dist_workers import reference_loss

    item_ids, query_ids = ID_CASES[ids]
    hn_ids = torch.tensor([item_ids[0].item(), -1, 3])  # masked for the anchors of that product
    b = _batch()
    q, k, h = (b[n].clone().requires_grad_() for n in ("q", "k", "h"))
    s = b["scale"].double().requires_grad_()
    loss_fn = ContrastiveLoss(symmetric, cross_device=False, mask_duplicate_items=halves[0],
                              mask_duplicate_queries=halves[1], block_size=4)
    labels = PairLabels(item_ids=item_ids, query_ids=query_ids, weights=b["weights"],
                        hard_negative_ids=hn_ids if hard else None)
    got = loss_fn(q, k, s, labels, h if hard else None)
    got_grads = torch.autograd.grad(got, [q, k, s] + ([h] if hard else []))
    want = reference_loss(q, k, s, item_ids if halves[0] else None, query_ids if halves[1] else None,
                          h if hard else None, hn_ids if hard else None, b["weights"], symmetric)
    want_grads = torch.autograd.grad(want, [q, k, s] + ([h] if hard else []))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, w in zip(got_grads, want_grads):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("symmetric", [False, True])
def test_weight_one_everywhere_is_the_unweighted_loss(symmetric):
    b = _batch(1)
    item_ids, query_ids = ID_CASES["both"]
    results = []
    for weights in (None, torch.ones(10)):
        q, k = b["q"].float().requires_grad_(), b["k"].float().requires_grad_()
        s = b["scale"].clone().requires_grad_()
        loss = ContrastiveLoss(symmetric, block_size=4)(q, k, s, PairLabels(item_ids, query_ids, weights))
        loss.backward()
        results.append((loss.detach(), q.grad, k.grad, s.grad))
    for a, w in zip(*results):
        torch.testing.assert_close(a, w, rtol=1e-7, atol=0)


def test_loss_config_defaults():
    """One pass is the default (gather_queries false); both halves of the rule on."""
    from clicktower.modeling.losses import LossConfig

    cfg = LossConfig()
    assert (cfg.gather_queries, cfg.mask_duplicate_items, cfg.mask_duplicate_queries) == (False, True, True)
    loss = ContrastiveLoss.from_config(LossConfig(mask_duplicate_queries=False), world_size=1)
    assert (loss.gather_queries, loss.mask_duplicate_queries, loss.cross_device) == (False, False, False)
