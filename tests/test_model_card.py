"""The exported router model's card: what it reads from the run folder around the exported
folder (``RUN/checkpoints/step_X``, ``RUN/final``), and what it says when something is absent
or broken. No model is trained or saved here (``tests/test_export.py`` does that end to end).
"""
from __future__ import annotations

import json

import pytest
import yaml

from clicktower.launcher.engine.export import ExportTowers, RunInfo, find_run_dir, render_model_card
from clicktower.modeling.towers import Tower

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def towers() -> ExportTowers:
    from transformers import BertConfig, BertModel

    encoder = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, vocab_size=100), add_pooling_layer=False)
    tower = Tower(encoder, "cls", projection_dim=8)
    return ExportTowers({"query": tower, "item": tower}, None, {"query": 12, "item": None}, 25.0)


def make_run(run, config, records):
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_run_folder_is_found_from_a_checkpoint_or_a_final_folder(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "final").mkdir()
    (tmp_path / "loose" / "towers").mkdir(parents=True)
    assert find_run_dir(run / "checkpoints" / "step_00000010") == run.resolve()
    assert find_run_dir(run / "final") == run.resolve()
    assert find_run_dir(tmp_path / "loose" / "towers") is None
    (tmp_path / "loose" / "metrics.jsonl").write_text("")
    assert find_run_dir(tmp_path / "loose" / "towers") == (tmp_path / "loose").resolve()


def test_card_of_a_checkpoint_of_a_run_that_went_on(tmp_path, towers):
    run = tmp_path / "run"
    (tmp_path / "clicks").mkdir()
    (tmp_path / "clicks" / "manifest.json").write_text(json.dumps({"num_samples": 1500000}))
    config = {"model": {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2"},
              "data": {"mix": [{"manifest": str(tmp_path / "clicks"), "weight": 0.7},
                               {"manifest": str(tmp_path / "gone"), "weight": 0.3}]},
              "train": {"batch_size": 64}}
    make_run(run, config, [{"step": 10, "loss": 3.0, "lr": 1e-4},
                           {"step": 20, "eval/ndcg@10": 0.41}])
    ckpt = run / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps(
        {"step": 10, "loader": {"epoch": 1, "samples_consumed": 640}, "topology": {"world_size": 4}}))

    card = render_model_card(RunInfo.gather(ckpt), towers, one_module=True)
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card.split("---")[1]
    assert "Base model: `sentence-transformers/all-MiniLM-L6-v2`" in card
    assert f"Training data `{tmp_path / 'clicks'}`: 1,500,000 pairs" in card
    assert f"Training data `{tmp_path / 'gone'}`: pair count not readable from here" in card
    assert "Batch: 64 pairs per process x 4 processes" in card and "epoch 1, 640 pairs into it" in card
    assert "Bad samples skipped by step 10: none recorded" in card
    # The eval at step 20 came after the exported step 10.
    assert "has no evaluation up to the exported step" in card and "0.41" not in card
    assert "queries are cut at 12 tokens, documents at the tokenizer's limit" in card
    assert "cls pooling, projection 32 -> 8" in card and "Trained temperature: 0.0400" in card
    assert "Missing from this card" not in card


def test_card_says_what_is_missing_or_broken(tmp_path, towers):
    loose = tmp_path / "somewhere" / "towers"
    loose.mkdir(parents=True)
    card = render_model_card(RunInfo.gather(loose), towers, one_module=False)
    assert "No run folder found around" in card and "No training config.yaml found" in card
    assert "Base model: unknown" in card and "No evaluation metrics: no metrics.jsonl" in card
    assert "stored once per route" in card  # shared towers without per-task lengths

    run = tmp_path / "run"
    make_run(run, {"model": {"bert_config": {"hidden_size": 32}, "tokenizer": "tok"}}, [])
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{not json\n')
    (run / "final").mkdir()
    card = render_model_card(RunInfo.gather(run / "final"), towers, one_module=True)
    assert "metrics.jsonl unreadable" in card and "line 2: invalid JSON" in card
    assert 'randomly initialised BERT ({"hidden_size": 32}), tokenizer `tok`' in card
    assert "base_model" not in card
