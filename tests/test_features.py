"""Item feature vectors: the fused item tower, and vectors through shards, loader, catalog,
embedding slices and export (model.item_features_dim, clicktower shard --features-*)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from clicktower.data.errors import DataError
from clicktower.data.features import FeatureTable, check_vector, load_features_file
from clicktower.data.loader import ClickPairLoader, DataConfig, Rank
from clicktower.data.shards import iter_shard, write_shards
from clicktower.data.sources import FieldMap
from clicktower.launcher.retrieval.embedding import embed_slice, embed_texts
from clicktower.launcher.retrieval.readers import load_towers, read_catalog_features
from clicktower.modeling.towers import FeatureFusion, Tower, TwoTower, TwoTowerConfig

pytestmark = pytest.mark.unit

BERT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=32)
DIM = 4


def tiny(fusion: str = "concat", shared: bool = True, **kw) -> TwoTower:
    torch.manual_seed(0)
    return TwoTower.from_config(TwoTowerConfig(bert_config=BERT, tokenizer="unused", item_features_dim=DIM,
                                               item_features_fusion=fusion, projection_dim=8,
                                               shared_towers=shared, **kw))


def tokens(rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 64, (rows, 6), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("fusion", ["concat", "gated", "add"])
@pytest.mark.parametrize("shared", [True, False])
def test_fusion_gradients_reach_the_feature_projection(fusion, shared):
    model = tiny(fusion, shared)
    ids, mask = tokens()
    q, i, scale = model(ids, mask, ids, mask, torch.randn(3, DIM), torch.tensor([True, True, False]))
    loss = -(torch.log_softmax(scale * q @ i.T, dim=1).diag()).mean()
    loss.backward()
    fused = model.item_tower.fusion
    assert fused.projection.weight.grad is not None and fused.projection.weight.grad.abs().sum() > 0
    assert fused.missing.grad.abs().sum() > 0  # row 2 has no vector
    assert model.query_tower.fusion is None  # the query side never fuses
    # Shared towers: one text encoder (the same parameters), the fusion on the item side only.
    assert (model.query_tower.encoder is model.item_tower.encoder) == shared
    assert model.shared == shared
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) and any("fusion.projection" in n for n in names)


def test_missing_vectors_use_the_learned_embedding():
    model = tiny("add").eval()
    ids, mask = tokens()
    present = torch.tensor([True, False, False])
    feats = torch.randn(3, DIM)
    a = model.item_tower(ids, mask, feats, present)
    b = model.item_tower(ids, mask, torch.randn(3, DIM) * 100, present)
    assert not torch.allclose(a[0], b[0])          # the vector counts where present
    assert torch.allclose(a[1:], b[1:])            # and is ignored where missing
    none = model.item_tower(ids, mask)             # no vectors at all: all missing
    assert torch.allclose(none[1:], a[1:], atol=1e-6)
    with torch.no_grad():
        model.item_tower.fusion.missing.add_(1.0)  # the missing rows follow the learned vector
    c = model.item_tower(ids, mask, feats, present)
    assert torch.allclose(c[0], a[0]) and not torch.allclose(c[1], a[1])


def test_fusion_starts_close_to_the_text_embedding():
    model = tiny("gated").eval()
    text_only = TwoTower.from_config(TwoTowerConfig(bert_config=BERT, tokenizer="unused", projection_dim=8))
    text_only.load_state_dict(model.state_dict(), strict=False)
    text_only.eval()
    ids, mask = tokens()
    # Zero missing embedding and gated fusion: an item without a vector is the text embedding.
    assert torch.allclose(model.item_tower(ids, mask), text_only.item_tower(ids, mask), atol=1e-6)


def test_config_is_validated():
    for bad in (dict(item_features_dim=0), dict(item_features_dim=4, item_features_fusion="sum"),
                dict(item_features_dim=4, item_features_dropout=1.0)):
        with pytest.raises(ValueError, match="model.item_features"):
            TwoTowerConfig(bert_config=BERT, tokenizer="unused", **bad)
    with pytest.raises(ValueError, match="expected"):
        FeatureFusion(DIM, 16)(torch.zeros(2, 16), torch.zeros(2, DIM + 1), None)


@pytest.mark.parametrize("shared", [True, False])
def test_save_load_keeps_the_fusion(tmp_path, shared):
    model = tiny("concat", shared).eval()
    model.save_pretrained(tmp_path / "final")
    meta = json.loads((tmp_path / "final" / "item_tower" / "clicktower_tower.json").read_text())
    assert meta["item_features_dim"] == DIM and meta["item_features_fusion"] == "concat"
    loaded = Tower.from_pretrained(tmp_path / "final" / "item_tower").eval()
    assert Tower.from_pretrained(tmp_path / "final" / "query_tower").fusion is None
    ids, mask = tokens()
    feats, present = torch.randn(3, DIM), torch.tensor([True, False, True])
    assert torch.allclose(loaded(ids, mask, feats, present), model.item_tower(ids, mask, feats, present), atol=1e-6)


def test_check_vector_names_what_is_wrong():
    assert check_vector([1, 2.5]).dtype == np.float32
    assert check_vector("[1, 2]", 2).tolist() == [1.0, 2.0]
    for bad, why in (([1.0, float("nan")], "NaN"), ([1, 2, 3], "length 3"), (["a", 1], "numbers"),
                     ([], "empty"), (np.array([[1.0]]), "1-D"), ("[1,", "JSON")):
        with pytest.raises(ValueError, match=why):
            check_vector(bad, 2)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(n=12, dim=DIM):
    rows = []
    for i in range(n):
        row = {"query": f"query {i}", "item_id": f"P{i}", "item_text": f"product {i}",
               "features": [float(i)] * dim if i % 4 != 3 else None,
               "negs": [{"item_id": f"N{i}", "item_text": f"neg {i}", "features": [-float(i)] * dim}]}
        rows.append(row)
    return rows


def test_vectors_survive_sharding_and_loading_with_hard_negatives(tmp_path):
    src = _write_jsonl(tmp_path / "clicks.jsonl", _rows())
    write_shards([src], str(tmp_path / "s"), FieldMap(features="features", hard_negatives="negs"), shard_size=5)
    samples = [s for p in sorted((tmp_path / "s").glob("*.tar")) for s in iter_shard(str(p))]
    assert [s.get("features") is None for s in samples] == [i % 4 == 3 for i in range(12)]
    loader = ClickPairLoader(DataConfig(hard_negatives_per_query=1, shuffle_buffer=1), str(tmp_path / "s"), 4,
                             tokens=_Tokens(), features_dim=DIM)
    seen = 0
    for batch in loader:
        n = batch.num_pairs
        feats, present = batch.item_features, batch.item_features_present
        assert feats.shape == (n + len(batch.labels.hard_negative_ids), DIM) and feats.dtype == torch.float32
        for row, item_id in enumerate(batch.items):
            i = int(item_id.split()[-1])
            assert bool(present[row]) == (i % 4 != 3)
            assert feats[row].tolist() == ([float(i)] * DIM if i % 4 != 3 else [0.0] * DIM)
        # The hard negatives' rows follow the items', with their own vectors.
        for row, text in enumerate(batch.tokens["hard_negative_texts"], start=n):
            assert present[row] and feats[row].tolist() == [-float(text.split()[-1])] * DIM
        seen += n
    assert seen == 12 and loader.error_counts()["missing_features"] == 3


def _feature_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "carry no item feature vector" in r.getMessage()]


def test_a_model_expecting_vectors_warns_once_when_the_first_batches_carry_none(tmp_path, caplog):
    """model.item_features_dim on shards without vectors: one warning line, once the first
    8 batches came without any (or at the end of a shorter epoch), never again; rank 1's
    loader stays quiet (one line per run); data with vectors gives none."""
    src = _write_jsonl(tmp_path / "clicks.jsonl", [{**r, "features": None} for r in _rows(12)])
    write_shards([src], str(tmp_path / "none"), FieldMap(features="features"), shard_size=5)
    with caplog.at_level(logging.WARNING, logger="clicktower.data"):
        loader = ClickPairLoader(DataConfig(shuffle_buffer=1), str(tmp_path / "none"), 1, features_dim=DIM)
        batches = iter(loader)
        for _ in range(7):
            next(batches)
        assert _feature_warnings(caplog) == []
        next(batches)
        assert _feature_warnings(caplog) == [
            f"model.item_features_dim={DIM}, but the first 8 batch(es) read (8 item rows) carry no item feature "
            "vector: the item tower trains on its learnt 'missing' embedding alone (were the shards written with "
            "--features-field or --features-file?)"]
        list(batches), list(loader)  # the rest of the epoch, and another one
        assert len(_feature_warnings(caplog)) == 1
        caplog.clear()
        short = ClickPairLoader(DataConfig(shuffle_buffer=1), str(tmp_path / "none"), 3, features_dim=DIM)
        list(short)  # 4 batches in the epoch: warned at its end
        assert [m.split(": ")[0] for m in _feature_warnings(caplog)] == [
            f"model.item_features_dim={DIM}, but the first 4 batch(es) read (12 item rows) carry no item feature vector"]
        caplog.clear()
        list(ClickPairLoader(DataConfig(shuffle_buffer=1), str(tmp_path / "none"), 1, Rank(1, 2), features_dim=DIM))
        # A second loader of the first one's checked manifests (training's pca sample pass)
        # leaves the line to the first, which reads the same batches.
        list(ClickPairLoader(DataConfig(shuffle_buffer=1), short.manifests, 3, features_dim=DIM))
        src = _write_jsonl(tmp_path / "vectors.jsonl", _rows(12))
        write_shards([src], str(tmp_path / "some"), FieldMap(features="features"), shard_size=5)
        list(ClickPairLoader(DataConfig(shuffle_buffer=1), str(tmp_path / "some"), 1, features_dim=DIM))
    assert _feature_warnings(caplog) == []


class _Tokens:
    """A stand-in tokenizer: keeps the item texts so the test can match rows to vectors."""

    def __call__(self, queries, items, pad_to_multiple_of):
        return {"hard_negative_texts": items[len(queries):]}


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_bad_vectors_follow_on_error(tmp_path, policy, caplog):
    rows = _rows(8)
    rows[2]["features"] = [1.0] * (DIM + 1)        # wrong length for the model
    src = _write_jsonl(tmp_path / "clicks.jsonl", rows)
    write_shards([src], str(tmp_path / "s"), FieldMap(features="features"), shard_size=8)
    loader = ClickPairLoader(DataConfig(on_error=policy, shuffle_buffer=1), str(tmp_path / "s"), 7,
                             features_dim=DIM)
    if policy == "raise":
        with pytest.raises(DataError, match=r"00000-000000000003.*length 5, expected 4"):
            list(loader)
        return
    batches = list(loader)
    # The bad sample leaves its batch (7 slots, 6 samples), counted.
    assert sum(b.num_pairs for b in batches) == 6 and loader.error_counts()["bad_features"] == 1
    assert "00000-000000000003" in caplog.text


def test_non_finite_or_non_numeric_vectors_fail_sharding_naming_the_row(tmp_path):
    for bad in ([1.0, float("inf"), 0.0, 0.0], ["x", 1, 2, 3]):
        rows = _rows(3)
        rows[1]["features"] = bad
        src = _write_jsonl(tmp_path / "bad.jsonl", rows)
        with pytest.raises(DataError, match=r"line 2.*features"):
            write_shards([src], str(tmp_path / "out"), FieldMap(features="features"), shard_size=8, overwrite=True)


def test_features_file_keyed_by_item_id(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "features"} for r in _rows(6)]
    src = _write_jsonl(tmp_path / "clicks.jsonl", rows)
    np.save(tmp_path / "vec.npy", np.arange(12, dtype=np.float32).reshape(3, DIM))
    (tmp_path / "ids.txt").write_text("P1\nN2\nP4\n")
    manifest = write_shards([src], str(tmp_path / "s"), FieldMap(hard_negatives="negs"), shard_size=10,
                            features_file=(str(tmp_path / "vec.npy"), str(tmp_path / "ids.txt")))
    assert "features" in manifest["fields"]
    samples = {s["item_id"]: s for s in iter_shard(str(tmp_path / "s" / "shard-000000.tar"))}
    assert samples["P1"]["features"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert samples["P4"]["features"].tolist() == [8.0, 9.0, 10.0, 11.0]
    assert "features" not in samples["P0"]
    assert samples["P2"]["hard_negatives"][0]["features"].tolist() == [4.0, 5.0, 6.0, 7.0]
    (tmp_path / "ids.txt").write_text("P1\nP1\nP4\n")
    with pytest.raises(DataError, match="listed twice"):
        load_features_file(str(tmp_path / "vec.npy"), str(tmp_path / "ids.txt"))
    (tmp_path / "ids.txt").write_text("P1\n")
    with pytest.raises(DataError, match="1 ids for the 3 rows"):
        load_features_file(str(tmp_path / "vec.npy"), str(tmp_path / "ids.txt"))


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_catalog_vectors_and_bad_ones(tmp_path, policy):
    rows = [{"item_id": "A", "item_text": "a", "features": [1.0] * DIM}, {"item_id": "B", "item_text": "b"},
            {"item_id": "C", "item_text": "c", "features": [1.0, float("nan"), 0.0, 0.0]}]
    path = _write_jsonl(tmp_path / "catalog.jsonl", rows)
    if policy == "raise":
        with pytest.raises(DataError, match=r"item 'C'.*NaN"):
            read_catalog_features(path, "features", DIM, "raise")
        return
    ids, texts, table = read_catalog_features(path, "features", DIM, "skip")
    assert ids == ["A", "B", "C"] and table.present.tolist() == [True, False, False]
    assert table.bad_features == 1 and table.num_missing == 2


@pytest.fixture
def tok(tmp_path):
    """A word-level tokenizer within the tiny model's 64-token vocabulary."""
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(40)]]))
    return BertTokenizerFast(str(vocab))


def test_embedding_slices_keep_each_rows_vector(tok):
    """Ranks embed their slice (padded to the longest); the concatenation is the whole."""
    model = tiny("add").eval()
    texts = [f"w{i} w{i + 1}" for i in range(7)]
    table = FeatureTable.from_rows([np.full(DIM, float(i), np.float32) if i != 5 else None for i in range(7)], DIM)
    whole = embed_texts(model.item_tower, tok, texts, 8, 3, table)
    parts = torch.cat([embed_slice(model.item_tower, tok, texts, 8, r, 3, 2, table) for r in range(3)])
    assert torch.allclose(whole, parts, atol=1e-6)
    without = embed_texts(model.item_tower, tok, texts, 8, 3)
    assert torch.allclose(whole[5], without[5], atol=1e-6) and not torch.allclose(whole[4], without[4])


def test_export_writes_the_fusion_that_embed_uses(tmp_path, tok):
    from clicktower.launcher.engine.export import export

    model = tiny("concat").eval()
    model.save_pretrained(tmp_path / "final", tok, 16, 16)
    summary = export(str(tmp_path / "final"), str(tmp_path / "exported"))
    assert summary["item_features"]["dim"] == DIM and "text only" in summary["item_features"]["note"]
    card = (tmp_path / "exported" / "sentence_transformers" / "router" / "README.md").read_text()
    assert "Item feature vectors" in card
    _, item, tokenizer = load_towers(str(tmp_path / "exported"))
    assert item.features_dim == DIM
    ids = tokenizer(["w1 w2", "w3"], return_tensors="pt", padding=True)
    feats, present = torch.randn(2, DIM), torch.tensor([True, False])
    got = item.eval()(ids["input_ids"], ids["attention_mask"], feats, present)
    want = model.item_tower(ids["input_ids"], ids["attention_mask"], feats, present)
    assert torch.allclose(got, want, atol=1e-5)
