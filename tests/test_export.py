"""Export: a checkpoint becomes HF and sentence-transformers folders with the trainer's embeddings."""
from __future__ import annotations

import pytest
import torch
import yaml
from accelerate import Accelerator

from clicktower.launcher.checkpoint import CheckpointConfig, Checkpointer
from clicktower.launcher.config import load_config, to_dict
from clicktower.launcher.retrieval import embed_texts
from clicktower.modeling.towers import TwoTower

from conftest import TINY_CONFIG, clicktower

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
    folder = Checkpointer(acc, tmp_path / "run", CheckpointConfig()).save(
        7, {"loader": {}}, yaml.safe_dump(to_dict(cfg)))

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
