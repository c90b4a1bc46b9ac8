"""Export: a checkpoint becomes HF and sentence-transformers folders with the trainer's embeddings.

- An accelerate checkpoint of an in-process model (shared and separate towers).
- A real ZeRO-3 checkpoint: 2 CPU processes under DeepSpeed (``accelerate launch``) train 4
  steps; its step-4 checkpoint (each rank's weight partition only) is consolidated by
  ``clicktower export`` and must embed like the towers the trainer wrote at the same step from
  its live engine (``final/``, gathered by DeepSpeed's GatheredParameters: another path).
"""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from accelerate import Accelerator

from clicktower.launcher.engine.checkpoint import CheckpointConfig, Checkpointer
from clicktower.launcher.engine.config import load_config, to_dict
from clicktower.launcher.retrieval.embedding import embed_texts
from clicktower.modeling.towers import TwoTower

from conftest import TINY_CONFIG, clicktower
from dist_launch import accelerate_launch

pytestmark = pytest.mark.e2e

TEXTS = ["cordless drill 20v", "grey couch", "Varlo 52 in. Ceiling Fan with Remote, Matte Black", "x"]


@pytest.mark.parametrize("shared", [True, False])
def test_export_matches_trainer_embeddings(tmp_path, shared):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    cfg = load_config(TINY_CONFIG, [f"model.shared_towers={str(shared).lower()}"])
    torch.manual_seed(3)
    model = TwoTower.from_config(cfg.model)
    with torch.no_grad():  # move away from the init so a missed load would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    acc = Accelerator(cpu=True)
    model = acc.prepare(model)
    folder = Checkpointer(acc, tmp_path / "run", CheckpointConfig(), yaml.safe_dump(to_dict(cfg))).save(
        7, {"loader": {}})

    result = clicktower("export", str(folder), "--out", str(tmp_path / "export"))
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path)
    for side, tower, limit in (("query", model.query_tower, cfg.model.max_query_length),
                               ("item", model.item_tower, cfg.model.max_item_length)):
        expected = embed_texts(tower, tokenizer, TEXTS, limit)
        st = SentenceTransformer(str(tmp_path / "export" / "sentence_transformers" / side), device="cpu")
        got = torch.from_numpy(st.encode(TEXTS, convert_to_numpy=True))
        assert got.shape == expected.shape == (4, 16)
        assert torch.allclose(got, expected, atol=1e-5)
        assert AutoModel.from_pretrained(tmp_path / "export" / f"{side}_tower").config.hidden_size == 32


def test_export_of_a_missing_checkpoint_is_a_user_error(tmp_path):
    result = clicktower("export", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "no such checkpoint folder" in result.stderr


@pytest.mark.slow
def test_export_of_a_real_zero3_checkpoint_matches_the_trainer(shard_dir, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from clicktower.modeling.towers import Tower

    out = tmp_path / "run"
    result = accelerate_launch("cpu_2proc_zero3", [
        "-m", "clicktower.launcher.train", "--config", str(TINY_CONFIG), f"data.train_manifest={shard_dir}",
        f"train.output_dir={out}", "train.max_steps=4", "checkpoint.every_steps=4", "train.resume=none",
        "train.progress_bar=false", "model.shared_towers=false"])
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = out / "checkpoints" / "step_00000004"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["topology"] == {"world_size": 2, "zero_stage": 3}
    # ZeRO-3 shards: no consolidated weights in the checkpoint, one partition per rank.
    assert len(list((ckpt / "pytorch_model").glob("*optim_states.pt"))) == 2
    assert not (ckpt / "model.safetensors").exists()

    result = clicktower("export", str(ckpt), "--out", str(tmp_path / "export"))
    assert result.returncode == 0, result.stderr[-2000:]
    cfg = load_config(ckpt / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path)
    embeddings = {}
    for side, limit in (("query", cfg.model.max_query_length), ("item", cfg.model.max_item_length)):
        expected = embed_texts(Tower.from_pretrained(out / "final" / f"{side}_tower"), tokenizer, TEXTS, limit)
        st = SentenceTransformer(str(tmp_path / "export" / "sentence_transformers" / side), device="cpu")
        got = torch.from_numpy(st.encode(TEXTS, convert_to_numpy=True))
        assert got.shape == expected.shape == (4, 16)
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
        embeddings[side] = got
    # Separate towers, both trained: a tower exported in place of the other would show.
    assert not torch.allclose(embeddings["query"], embeddings["item"], atol=1e-3)
