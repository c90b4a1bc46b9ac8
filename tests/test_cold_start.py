"""Cold start: the cold/warm split of the metrics (clicktower eval --train-manifest) and the
synthetic data that makes it (clicktower synth --cold-items, --image-features)."""
from __future__ import annotations

import json

import pytest

from clicktower.data.shards import write_shards
from clicktower.data.sources import FieldMap
from clicktower.data.synth import CATEGORIES, VISUAL_AXES, generate
from clicktower.launcher.retrieval.metrics import cold_warm_metrics, query_metrics
from clicktower.launcher.retrieval.readers import trained_item_ids

pytestmark = pytest.mark.unit


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cold_warm_split_on_a_hand_built_case():
    judged = [{"A": 3, "B": 1},            # relevant A: trained -> warm
              {"C": 3, "D": 2},            # C and D never clicked -> cold
              {"C": 3, "A": 2},            # one relevant item trained -> warm
              {"A": 1}]                    # no relevant item: in neither part
    ranked = [["A", "B"], ["X", "D", "C"], ["C", "A"], ["A"]]
    per_query = [query_metrics(r, g, 2.0) for r, g in zip(ranked, judged)]
    out = cold_warm_metrics(per_query, judged, trained_items={"A", "B"}, min_relevance=2.0)
    assert out["cold/num_queries"] == 1 and out["warm/num_queries"] == 2
    assert out["cold/recall@1"] == 0.0 and out["cold/recall@10"] == 1.0 and out["cold/mrr@10"] == 0.5
    assert out["warm/recall@1"] == pytest.approx((1.0 + 0.5) / 2) and out["warm/mrr@10"] == 1.0
    nothing = cold_warm_metrics(per_query, judged, trained_items=set(), min_relevance=2.0)
    assert nothing["cold/num_queries"] == 3 and nothing["warm/num_queries"] == 0
    assert "warm/recall@10" not in nothing


def test_cold_items_never_clicked_but_in_catalog_and_judgements(tmp_path):
    plain = generate(tmp_path / "plain", 3000, seed=2)
    counts = generate(tmp_path / "cold", 3000, seed=2, cold_items=60)
    assert counts["cold_items"] == 60 and "cold_items" not in plain
    catalog = {r["item_id"] for r in _read(tmp_path / "cold" / "catalog.jsonl")}
    clicked = {r["item_id"] for r in _read(tmp_path / "cold" / "train.jsonl")}
    never = catalog - clicked
    assert len(never) >= 60 and len(catalog) == counts["items"]
    judged = {i for r in _read(tmp_path / "cold" / "eval.jsonl") for i, g in r["relevance"].items() if g >= 2}
    assert judged & never  # cold products are still judged relevant for some eval queries
    # The catalog is that of the run without cold items (eval queries differ a little: they
    # are held out from other training queries).
    assert (tmp_path / "cold" / "catalog.jsonl").read_bytes() == (tmp_path / "plain" / "catalog.jsonl").read_bytes()
    # The shard set's positives are what eval's --train-manifest reads.
    write_shards([str(tmp_path / "cold" / "train.jsonl")], str(tmp_path / "shards"), FieldMap(), shard_size=700)
    assert trained_item_ids(str(tmp_path / "shards")) == clicked
    with pytest.raises(ValueError, match="--cold-items"):
        generate(tmp_path / "bad", 3000, seed=2, cold_items=10_000)


def test_image_features_show_what_titles_leave_out(tmp_path):
    generate(tmp_path / "plain", 1500, seed=5)
    counts = generate(tmp_path / "img", 1500, seed=5, image_features=16)
    assert counts["image_features"] == 16
    plain, img = _read(tmp_path / "plain" / "catalog.jsonl"), _read(tmp_path / "img" / "catalog.jsonl")
    vectors = [r["features"] for r in img]
    assert all(v is None or len(v) == 16 for v in vectors) and sum(v is None for v in vectors) < len(img) // 5
    changed = [(a, b) for a, b in zip(plain, img) if a["item_text"] != b["item_text"]]
    assert len(img) // 4 < len(changed) < 3 * len(img) // 4
    # Only titles change, by losing their colour and material; clicks and queries stay.
    visual = sorted({v for c in CATEGORIES for a in VISUAL_AXES for v in c.attributes.get(a, {})}, key=len)
    lost = 0
    for a, b in changed:
        shown = [v for v in visual if v in a["item_text"]]  # (some templates show 2 of 3 values)
        assert not any(v in b["item_text"] for v in shown)
        lost += bool(shown)
    assert lost > 0.8 * len(changed)
    train_plain, train_img = _read(tmp_path / "plain" / "train.jsonl"), _read(tmp_path / "img" / "train.jsonl")
    assert [(r["query"], r["item_id"]) for r in train_plain] == [(r["query"], r["item_id"]) for r in train_img]
    by_id = {r["item_id"]: r for r in img}
    assert all(r["features"] == by_id[r["item_id"]]["features"] for r in train_img)
    assert (tmp_path / "plain" / "eval.jsonl").read_bytes() == (tmp_path / "img" / "eval.jsonl").read_bytes()


def test_same_products_same_vector_direction_per_facet(tmp_path):
    """Two products with the same colour and material have close vectors; the noise is small."""
    import numpy as np

    from clicktower.data.synth import add_image_features, build_catalog
    import random

    products = build_catalog(random.Random(0), 400)
    vectors = add_image_features(products, 32, seed=0)
    groups: dict = {}
    for p in products:
        key = tuple(sorted((a, v) for a, v in p.values.items() if a in VISUAL_AXES))
        if vectors[p.item_id] is not None:
            groups.setdefault(key, []).append(np.array(vectors[p.item_id]))
    same = [np.corrcoef(g[0], g[1])[0, 1] for g in groups.values() if len(g) > 1]
    keys = [k for k, g in groups.items() if g]
    other = [np.corrcoef(groups[a][0], groups[b][0])[0, 1] for a, b in zip(keys, keys[1:]) if set(a).isdisjoint(b)]
    assert np.mean(same) > 0.8 and abs(np.mean(other)) < 0.3
