"""``model.projection_init=pca``: the projection starts at the principal axes of the towers'
own pooled embeddings of the first training pairs (``launcher/engine/projection_init.py``).

- ``principal_axes``: orthonormal, strongest first, deterministic signs;
- as a rotation (projection_dim = hidden size) the full embedding scores exactly as the
  unprojected towers, and its leading k dimensions hold the most of the sample's energy any k
  directions can (more than the raw leading ones);
- separate towers get the same axes; config errors; fitted on the main process and received
  by the other rank (2 gloo ranks); through ``clicktower train``.
"""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from clicktower.launcher.engine.projection_init import init_projection_pca, pooled_sample
from clicktower.launcher.errors import ConfigError
from clicktower.modeling.towers import TwoTowerConfig, principal_axes
from conftest import TINY_CONFIG, clicktower
from dist_harness import run_ranks
from dist_projection import pca_init_worker, tiny_two_tower, token_batches


@pytest.mark.unit
def test_principal_axes_are_orthonormal_strongest_first_with_fixed_signs():
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1])
    basis, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen))
    x = (torch.randn(400, 5, generator=gen) * scales) @ basis.T + 0.3 * basis[:, 0]
    axes = principal_axes(x, 5)
    assert torch.allclose(axes @ axes.T, torch.eye(5), atol=1e-5)
    energy = ((x @ axes.T) ** 2).sum(0)
    assert torch.all(energy[:-1] >= energy[1:])  # strongest first
    assert abs(float(axes[0] @ basis[:, 0])) > 0.99  # the dominant direction found
    assert torch.all(axes @ x.mean(0) >= 0)  # signs: the mean projects non-negatively
    assert torch.equal(principal_axes(x, 2), axes[:2])
    few = principal_axes(x[:3], 5)  # fewer samples than dimensions: still a full basis
    assert torch.allclose(few @ few.T, torch.eye(5), atol=1e-5)
    with pytest.raises(ValueError, match="outside 1..5"):
        principal_axes(x, 6)


@pytest.mark.unit
def test_pca_rotation_keeps_full_scores_and_puts_the_energy_first():
    model = tiny_two_tower()
    batches = token_batches(1)
    sample = pooled_sample(model, batches, 16, "cpu")
    assert sample.shape == (2 * 16, 16)  # queries and items of the first 16 pairs (2 batches)
    model.eval()
    inputs = batches[2].model_inputs()
    with torch.no_grad():
        q_raw = F.normalize(model.query_tower.pooled(inputs["query_input_ids"], inputs["query_attention_mask"]), dim=-1)
        k_raw = F.normalize(model.item_tower.pooled(inputs["item_input_ids"], inputs["item_attention_mask"]), dim=-1)
        init_projection_pca(model, lambda: batches, 16, "cpu", True, None)
        q, k, _ = model(**inputs)
    assert torch.allclose(q @ k.T, q_raw @ k_raw.T, atol=1e-5)  # a rotation: the scores unchanged
    axes = model.query_tower.projection.weight.detach()
    k_dims = 4
    lead = ((sample @ axes[:k_dims].T) ** 2).sum()
    raw = (sample[:, :k_dims] ** 2).sum()
    best = torch.linalg.svdvals(sample.double())[:k_dims].pow(2).sum()
    assert lead > raw and torch.allclose(lead.double(), best, rtol=1e-4)


@pytest.mark.unit
def test_separate_towers_get_the_same_axes_and_bad_settings_are_refused():
    model = tiny_two_tower(shared=False)
    assert model.query_tower.projection is not model.item_tower.projection
    init_projection_pca(model, lambda: token_batches(2), 8, "cpu", True, None)
    assert torch.equal(model.query_tower.projection.weight, model.item_tower.projection.weight)
    with pytest.raises(ValueError, match="needs model.projection_dim"):
        TwoTowerConfig(bert_config={}, tokenizer="t", projection_init="pca")
    with pytest.raises(ValueError, match="projection_init must be random or pca"):
        TwoTowerConfig(bert_config={}, tokenizer="t", projection_dim=4, projection_init="svd")
    with pytest.raises(ValueError, match="projection_init_pairs must be >= 1"):
        TwoTowerConfig(bert_config={}, tokenizer="t", projection_dim=4, projection_init="pca", projection_init_pairs=0)
    with pytest.raises(ConfigError, match="no batch"):
        init_projection_pca(tiny_two_tower(), lambda: [], 8, "cpu", True, None)
    partitioned = tiny_two_tower()
    partitioned.query_tower.projection.weight.ds_shape = (16, 16)  # how ZeRO-3's zero.Init marks a partition
    with pytest.raises(ConfigError, match="zero3_init_flag"):
        init_projection_pca(partitioned, lambda: token_batches(2), 8, "cpu", True, None)


@pytest.mark.multiprocess
def test_the_main_process_fits_and_every_rank_gets_its_axes():
    weights = run_ranks(pca_init_worker, 2)
    assert torch.equal(weights[0], weights[1])
    expected = principal_axes(pooled_sample(tiny_two_tower(), token_batches(0), 16, "cpu"), 16)
    assert torch.allclose(weights[0], expected, atol=1e-5)
    other = principal_axes(pooled_sample(tiny_two_tower(), token_batches(1), 16, "cpu"), 16)
    assert not torch.allclose(weights[0], other, atol=1e-3)  # rank 1's own data would differ


@pytest.mark.e2e
def test_train_starts_from_the_pca_projection(shard_dir, tmp_path):
    """Through ``clicktower train`` (tiny BERT, hidden 32): with a learning rate too small to
    move it, the final projection is still a rotation; the random start is not one; a
    projection wider than the encoder is refused with one line. The sample pass reads the
    training loader's checked manifests: a missing shard is reported once, not twice."""
    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    (shards / sorted(p.name for p in shards.glob("shard-*.tar"))[-1]).unlink()
    common = ["--config", str(TINY_CONFIG), f"data.train_manifest={shards}", "data.on_error=skip",
              "train.max_steps=2", "train.progress_bar=false", "optim.lr=1e-9", "model.projection_dim=32"]
    for init in ("pca", "random"):
        result = clicktower("train", *common, f"train.output_dir={tmp_path / init}", f"model.projection_init={init}")
        assert result.returncode == 0, result.stderr
        assert result.stderr.count("its samples leave the order") == 1, result.stderr
        weight = torch.load(tmp_path / init / "final" / "query_tower" / "projection.pt")["weight"]
        off = float((weight @ weight.T - torch.eye(32)).abs().max())
        assert (off < 1e-4) if init == "pca" else (off > 0.5), (init, off)
    result = clicktower("train", *common[:-1], f"train.output_dir={tmp_path / 'wide'}", "model.projection_dim=64",
                        "model.projection_init=pca")
    assert result.returncode == 2 and "more than the encoder's 32 dimensions" in result.stderr
