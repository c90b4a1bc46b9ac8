"""In-batch NT-Xent against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

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
    loss = ContrastiveLoss(symmetric=False)(Q, K, torch.tensor(1.0), item_ids=ids)
    expected = [math.log(E + 1) - 1, ROW_LOSSES[1], math.log(1 + E) - 1]
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    # Id -1 means unknown and never matches.
    unknown = ContrastiveLoss(symmetric=False)(Q, K, torch.tensor(1.0), item_ids=torch.tensor([-1, 8, -1]))
    assert unknown.item() == pytest.approx(sum(ROW_LOSSES) / 3, rel=1e-6)


def test_temperature_and_hard_negatives_match_cross_entropy():
    torch.manual_seed(0)
    q, k, h = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1), torch.randn(3, 8)
    scale = torch.tensor(20.0)
    loss = ContrastiveLoss(symmetric=False)(q, k, scale, hard_negative_emb=h)
    ref = F.cross_entropy(scale * q @ torch.cat([k, h]).T, torch.arange(5))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
