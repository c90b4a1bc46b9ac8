"""gather_with_grad: identity without a process group; on 2 gloo ranks with uneven sizes,
values in rank order and each slice's gradient summed over ranks."""
from __future__ import annotations

import pytest
import torch

from clicktower.kernels import gather_with_grad
from dist_harness import run_ranks
from dist_workers import gather_worker


@pytest.mark.unit
def test_identity_without_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    y = gather_with_grad(x)
    assert y is x
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 4))


@pytest.mark.multiprocess
def test_uneven_gather_and_summed_gradient():
    sizes = (2, 3)
    full = torch.arange(10, dtype=torch.float32).view(5, 2)
    results = run_ranks(gather_worker, 2)
    # Rank r's loss weighs gathered row j by (r + 1) * (j + 1): the slice's gradient is the
    # sum over ranks, (1 + 2) * (j + 1).
    expected_grad = 3.0 * torch.arange(1, 6, dtype=torch.float32)[:, None].expand(5, 2)
    for rank, r in enumerate(results):
        assert torch.equal(r["gathered"], full)
        start = sum(sizes[:rank])
        assert torch.equal(r["grad"], expected_grad[start:start + sizes[rank]])
        assert torch.equal(r["ids"], torch.tensor([10, 11, 12, 13, 14]))
