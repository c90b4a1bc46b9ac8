"""Export: a checkpoint becomes HF and sentence-transformers folders with the trainer's embeddings.

- An accelerate checkpoint of an in-process model (shared and separate towers), and its
  ``final/`` folder: the per-tower folders, and the one router model whose ``encode_query`` /
  ``encode_document`` run the query / item tower (each at its own token limit), with a model
  card filled from the run folder (or saying what is missing).
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
from clicktower.launcher.engine.export import export
from clicktower.launcher.retrieval.embedding import embed_texts
from clicktower.modeling.towers import TwoTower

from conftest import TINY_CONFIG, clicktower
from dist_launch import accelerate_launch

pytestmark = pytest.mark.e2e

# The third is 22 tokens: cut at a 16-token query limit, whole under a 32-token item limit.
TEXTS = ["cordless drill 20v", "grey couch",
         "Varlo 52 in. Indoor Matte Black Ceiling Fan with Light Kit and Remote Control, 3 Blades", "x"]


def assert_router_matches(router_dir, towers, tokenizer, limits):
    """The router model's query and document routes embed like the query and item towers."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(router_dir), device="cpu")
    got_query = torch.from_numpy(st.encode_query(TEXTS, convert_to_numpy=True))
    got_item = torch.from_numpy(st.encode_document(TEXTS, convert_to_numpy=True))
    expected_query = embed_texts(towers["query"], tokenizer, TEXTS, limits["query"])
    expected_item = embed_texts(towers["item"], tokenizer, TEXTS, limits["item"])
    assert got_query.shape == got_item.shape == expected_query.shape == (4, 16)
    assert torch.allclose(got_query, expected_query, atol=1e-5), (got_query - expected_query).abs().max()
    assert torch.allclose(got_item, expected_item, atol=1e-5), (got_item - expected_item).abs().max()
    # Plain encode() takes the document route.
    assert torch.allclose(torch.from_numpy(st.encode(TEXTS, convert_to_numpy=True)), expected_item, atol=1e-5)
    return got_query, got_item


def write_run_files(run, cfg, manifest):
    """A run folder's config.yaml and metrics.jsonl (one eval before the checkpoint, one after),
    and a manifest with a pair count, as training would leave them."""
    manifest.mkdir()
    (manifest / "manifest.json").write_text(json.dumps({"num_samples": 4321, "shards": []}))
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    records = [{"step": 5, "loss": 2.5, "lr": 1e-3, "data_decode_error": 3},
               {"step": 5, "eval/recall@10": 0.6123, "eval/ndcg@10": 0.5},
               {"step": 9, "loss": 1.0, "lr": 1e-3},
               {"step": 9, "eval/recall@10": 0.9999}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("shared", [True, False])
def test_export_matches_trainer_embeddings(tmp_path, shared):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    cfg = load_config(TINY_CONFIG, [f"model.shared_towers={str(shared).lower()}",
                                    f"data.train_manifest={tmp_path / 'shards'}"])
    torch.manual_seed(3)
    model = TwoTower.from_config(cfg.model)
    with torch.no_grad():  # move away from the init so a missed load would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    acc = Accelerator(cpu=True)
    model = acc.prepare(model)
    folder = Checkpointer(acc, tmp_path / "run", CheckpointConfig(), yaml.safe_dump(to_dict(cfg))).save(
        7, {"loader": {"epoch": 0, "samples_consumed": 112}})
    if shared:  # a run folder with its config and metrics; the separate-towers run has none
        write_run_files(tmp_path / "run", cfg, tmp_path / "shards")

    result = clicktower("export", str(folder), "--out", str(tmp_path / "export"))
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path)
    towers = {"query": model.query_tower, "item": model.item_tower}
    limits = {"query": cfg.model.max_query_length, "item": cfg.model.max_item_length}
    for side in ("query", "item"):
        expected = embed_texts(towers[side], tokenizer, TEXTS, limits[side])
        st = SentenceTransformer(str(tmp_path / "export" / "sentence_transformers" / side), device="cpu")
        got = torch.from_numpy(st.encode(TEXTS, convert_to_numpy=True))
        assert got.shape == expected.shape == (4, 16)
        assert torch.allclose(got, expected, atol=1e-5)
        assert AutoModel.from_pretrained(tmp_path / "export" / f"{side}_tower").config.hidden_size == 32

    router = tmp_path / "export" / "sentence_transformers" / "router"
    got_query, got_item = assert_router_matches(router, towers, tokenizer, limits)
    # The long title is cut at 16 tokens as a query and at 32 as a document, even with one encoder.
    assert not torch.allclose(got_query[2], got_item[2], atol=1e-3)
    # Shared towers: one encoder stored once; separate: one per route.
    assert len(list(router.glob("*_Transformer"))) == (1 if shared else 2)
    assert json.loads((tmp_path / "export" / "export.json").read_text())["router"] == str(router)
    card = (router / "README.md").read_text()
    assert "encode_query" in card and "clicktower 0.1.0" in card and "sentence-transformers: " in card
    assert "randomly initialised BERT" in card and "projection 32 -> 16" in card and "at step 7" in card
    if shared:
        assert "projection_dim: 16" in card  # the training config
        assert f"Training data `{tmp_path / 'shards'}`: 4,321 pairs" in card
        assert "epoch 0, 112 pairs into it" in card and "decode_error 3" in card
        # The last eval up to the exported step 7, not the one logged later at step 9.
        assert "(step 5)" in card and "| recall@10 | 0.6123 |" in card and "0.9999" not in card
        assert "Missing from this card" not in card
    else:  # the run folder has neither file: the card says so and uses the checkpoint's config
        assert f"No {tmp_path / 'run' / 'metrics.jsonl'}" in card and "No evaluation metrics: no metrics.jsonl" in card
        assert f"Training config (`{folder / 'config.yaml'}`)" in card and "projection_dim: 16" in card

    # The final/ folder of the same model exports to the same router model (in-process this time).
    model.save_pretrained(tmp_path / "run" / "final", tokenizer)
    export(str(tmp_path / "run" / "final"), str(tmp_path / "export_final"))
    router = tmp_path / "export_final" / "sentence_transformers" / "router"
    assert_router_matches(router, towers, tokenizer, limits)
    assert len(list(router.glob("*_Transformer"))) == (1 if shared else 2)
    card = (router / "README.md").read_text()
    if shared:
        assert "at step 9" in card and "| recall@10 | 0.9999 |" in card and "projection_dim: 16" in card
    else:
        assert "No training config.yaml found" in card and "Base model: unknown" in card


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
    final = {side: Tower.from_pretrained(out / "final" / f"{side}_tower") for side in ("query", "item")}
    router = tmp_path / "export" / "sentence_transformers" / "router"
    assert_router_matches(router, final, tokenizer,
                          {"query": cfg.model.max_query_length, "item": cfg.model.max_item_length})
    card = (router / "README.md").read_text()
    assert f"Run folder: `{out}`" in card and "at step 4" in card and "x 2 processes" in card
