"""``clicktower export --onnx``: each tower (encoder, pooling, projection, normalisation) as an
ONNX graph that onnxruntime runs to the PyTorch tower's embeddings within 1e-4, at batch sizes
and lengths other than the traced example's (separate towers: two graphs)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoTokenizer

from clicktower.launcher.engine.config import load_config
from clicktower.launcher.engine.export import export
from clicktower.launcher.engine.onnx_export import ONNX_TOLERANCE, OnnxEncoder
from clicktower.launcher.retrieval.embedding import embed_texts
from clicktower.modeling.towers import TwoTower

from conftest import TINY_CONFIG

TEXTS = ["cordless drill 20v", "grey couch", "x", "stainless steel double bowl kitchen sink " * 6,
         "led bulb", "outdoor patio furniture set with cushions and umbrella", "paint", "hammer drill bits set"]


def _final(tmp_path, shared: bool):
    cfg = load_config(TINY_CONFIG, [f"model.shared_towers={str(shared).lower()}", "model.length_buckets=2"])
    torch.manual_seed(5)
    model = TwoTower.from_config(cfg.model)
    with torch.no_grad():  # away from the init, so a graph of the wrong weights would show
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path)
    model.save_pretrained(tmp_path / "final", tokenizer)
    return model, tokenizer, cfg


@pytest.mark.unit
@pytest.mark.slow
@pytest.mark.parametrize("shared,fused", [(False, False), (True, True)])
def test_onnx_towers_equal_pytorch(tmp_path, shared, fused):
    model, tokenizer, cfg = _final(tmp_path, shared)
    summary = export(str(tmp_path / "final"), str(tmp_path / "out"), onnx=not fused, onnx_fused=fused)
    folder = tmp_path / "out" / "onnx"
    meta = json.loads((folder / "onnx.json").read_text())
    assert summary["onnx"] == meta and (folder / "tokenizer" / "tokenizer_config.json").is_file()
    assert meta["fused"] is fused
    if fused:  # the fused operators replaced the plain subgraphs, and still equal PyTorch below
        ops = {node.op_type for node in onnx.load(str(folder / "item.onnx")).graph.node}
        assert {"Attention", "SkipLayerNormalization"} <= ops and "Softmax" not in ops
        assert meta["towers"]["item"]["fused_operators"]["Attention"] == model.item_tower.encoder.config.num_hidden_layers
    towers = {"query": model.query_tower, "item": model.item_tower}
    limits = {"query": cfg.model.max_query_length, "item": cfg.model.max_item_length}
    for side in ("query", "item"):
        assert meta["towers"][side]["max_length"] == limits[side]
        assert meta["towers"][side]["max_abs_diff_vs_torch"] <= ONNX_TOLERANCE
        want = embed_texts(towers[side], tokenizer, TEXTS, limits[side]).numpy()
        for batch in (1, 3, 8):  # other batch sizes and padded lengths than the traced example
            got = OnnxEncoder(folder / f"{side}.onnx", folder / "tokenizer", limits[side]).encode(TEXTS, batch)
            assert got.shape == want.shape == (len(TEXTS), 16)
            assert np.abs(got - want).max() <= ONNX_TOLERANCE
    if not shared:  # two towers, two graphs: not the same weights
        q = OnnxEncoder(folder / "query.onnx", tokenizer, 16).encode(TEXTS[:2])
        i = OnnxEncoder(folder / "item.onnx", tokenizer, 16).encode(TEXTS[:2])
        assert np.abs(q - i).max() > 1e-3
