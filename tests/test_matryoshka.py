"""Matryoshka training (``loss.matryoshka_dims``): every prefix of the embeddings is its own
contrastive problem through the fused kernel, on the same embeddings. Against the dense
reference (the weighted sum of per-prefix dense losses) in one process and on 2 gloo ranks,
with ids, weights, exclusions and hard negatives, both symmetric paths, and GradCache."""
from __future__ import annotations

import pytest
import torch

from clicktower.launcher.engine.config import load_config
from clicktower.launcher.engine.schema import ConfigError
from clicktower.modeling.losses import ContrastiveLoss, LossConfig
from dist_harness import run_ranks
from dist_matryoshka import (CASES, DIMS, WEIGHTS, case_labels, matryoshka_loss_worker, matryoshka_reference,
                             matryoshka_step_worker)
from dist_workers import BLOCK, SIZES, assert_gradient_contract, global_batch

from conftest import TINY_CONFIG

TOL = dict(rtol=1e-5, atol=1e-5)


def _leaves(data):
    return [data[n].clone().requires_grad_() for n in ("q", "k", "h", "scale")]


@pytest.mark.unit
@pytest.mark.parametrize("case", CASES, ids=str)
def test_one_process_equals_sum_of_dense_prefix_losses(case):
    symmetric, with_hn, gather, excl = case
    data = global_batch()
    q, k, h, s = _leaves(data)
    loss_fn = ContrastiveLoss(symmetric, False, gather, block_size=BLOCK, matryoshka_dims=DIMS,
                              matryoshka_weights=WEIGHTS)
    loss = loss_fn(q, k, s, case_labels(data, 0, 1, with_hn, excl), h if with_hn else None)
    loss.backward()
    rq, rk, rh, rs = _leaves(data)
    ref = matryoshka_reference(data, case, rq, rk, rs, rh)
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    for got, want in ((q, rq), (k, rk), (s, rs)) + (((h, rh),) if with_hn else ()):
        torch.testing.assert_close(got.grad, want.grad, **TOL)


@pytest.mark.unit
def test_prefixes_change_the_loss_and_full_dim_alone_is_the_plain_loss():
    data = global_batch()
    q, k, s = data["q"], data["k"], data["scale"]
    plain = ContrastiveLoss(block_size=BLOCK)(q, k, s)
    assert torch.equal(ContrastiveLoss(block_size=BLOCK, matryoshka_dims=[q.shape[1]])(q, k, s), plain)
    small = ContrastiveLoss(block_size=BLOCK, matryoshka_dims=[2])(q, k, s)
    assert abs(float(small - plain)) > 1e-3  # the prefix really is re-scored
    both = ContrastiveLoss(block_size=BLOCK, matryoshka_dims=[q.shape[1], 2], matryoshka_weights=[1.0, 3.0])(q, k, s)
    torch.testing.assert_close(both, plain + 3 * small, **TOL)


@pytest.mark.unit
def test_config_validation(tmp_path):
    assert load_config(TINY_CONFIG, ["loss.matryoshka_dims=[384, 128]"]).loss.matryoshka_dims == [384, 128]
    for bad in (dict(matryoshka_dims=[0]), dict(matryoshka_dims=[64, 64]), dict(matryoshka_dims=[]),
                dict(matryoshka_dims=[64, 32], matryoshka_weights=[1.0]),
                dict(matryoshka_weights=[1.0]), dict(matryoshka_dims=[8], matryoshka_weights=[-1.0])):
        with pytest.raises(ValueError):
            LossConfig(**bad)
    with pytest.raises(ConfigError):
        load_config(TINY_CONFIG, ["loss.matryoshka_dims=[384, -1]"])
    with pytest.raises(ValueError, match="larger than the embedding"):
        ContrastiveLoss(matryoshka_dims=[16])(torch.randn(2, 8), torch.randn(2, 8), torch.tensor(1.0))


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", CASES, ids=str)
def test_two_ranks_match_the_dense_reference(matryoshka_ranks, case):
    assert_gradient_contract([r[case] for r in matryoshka_ranks], (case[0], case[1]),
                             lambda d, c, q, k, s, h: matryoshka_reference(d, case, q, k, s, h), TOL)


@pytest.mark.multiprocess
def test_two_ranks_grad_cache_equals_one_backward():
    per_rank = run_ranks(matryoshka_step_worker, 2)
    for r in per_rank:
        for name, grad in r[None].items():
            torch.testing.assert_close(r[2][name], grad, **TOL, msg=name)
    assert float(per_rank[0][None]["proj.weight"].abs().max()) > 0


@pytest.fixture(scope="module")
def matryoshka_ranks():
    return run_ranks(matryoshka_loss_worker, len(SIZES))
