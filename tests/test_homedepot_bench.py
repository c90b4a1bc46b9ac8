"""Pure logic of ``benchmarks/homedepot.py``: the split by query and the paired bootstrap.

The benchmark itself (real data, ~20 minutes) is not part of the tests; these check the two
pieces its claims rest on, on small hand-made inputs.
"""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hd():
    # benchmarks/ is a folder of scripts, not a package: load the file itself.
    spec = importlib.util.spec_from_file_location("homedepot_bench", REPO / "benchmarks" / "homedepot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_per_query(folder: Path, name: str, rows: list[dict | None]) -> None:
    with open(folder / f"per_query_{name}.jsonl", "w", encoding="utf-8") as fh:
        for i, metrics in enumerate(rows):
            fh.write(json.dumps({"query": f"q{i}", "metrics": metrics, "top10": []}) + "\n")


def metrics(value: float) -> dict[str, float]:
    return {key: value for key in ("recall@10", "recall@100", "mrr@10", "ndcg@10")}


def test_bootstrap_of_a_constant_difference_is_that_difference(hd, tmp_path):
    # Every query gains exactly 0.25: every resample's mean is 0.25. The query without a
    # relevant item (None on both sides) must be skipped, not counted as 0.
    write_per_query(tmp_path, "a", [metrics(0.75), metrics(0.5), None, metrics(1.0)])
    write_per_query(tmp_path, "b", [metrics(0.5), metrics(0.25), None, metrics(0.75)])
    intervals = hd.paired_bootstrap(tmp_path, "a", "b", resamples=200)
    assert intervals == {key: [0.25, 0.25] for key in hd.METRICS}


def test_bootstrap_interval_brackets_the_mean_and_is_paired(hd, tmp_path):
    # Large per-query spread shared by both models, small consistent gain: pairing removes the
    # spread, so the interval is tight and above zero.
    base = [0.1 * (i % 10) for i in range(200)]
    write_per_query(tmp_path, "a", [metrics(v + 0.02 + (0.01 if i % 2 else -0.01)) for i, v in enumerate(base)])
    write_per_query(tmp_path, "b", [metrics(v) for v in base])
    low, high = hd.paired_bootstrap(tmp_path, "a", "b", resamples=500)["mrr@10"]
    assert 0.0 < low <= 0.02 <= high < 0.04
    low_rev, high_rev = hd.paired_bootstrap(tmp_path, "b", "a", resamples=500)["mrr@10"]
    assert high_rev < 0


def test_split_is_by_query_and_reproducible(hd, tmp_path):
    rows = []
    for q in range(40):
        for item in range(3):
            # Every query has one positive (3.0), one middling and one hard negative (1.0).
            rows.append({"id": len(rows), "product_uid": f"{q}-{item}", "product_title": f"title {q} {item}",
                         "search_term": f"query {q}", "relevance": (3.0, 2.0, 1.0)[item]})
    with open(tmp_path / "train.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(tmp_path / "catalog.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["product_uid", "product_title"])
        writer.writeheader()
        writer.writerows({"product_uid": r["product_uid"], "product_title": r["product_title"]} for r in rows)
    d = hd.load_data(tmp_path, val_queries=10, max_pairs=100, catalog_limit=None, seed=0)
    val = {q for q, _ in d["judged"]}
    train = {p["query"] for p in d["pairs"]}
    assert len(val) == 10 and len(train) == 30 and not val & train
    assert all(p["item_id"].endswith("-0") for p in d["pairs"])  # only relevance >= 2.67
    assert all([n["item_id"] for n in p["hard_negatives"]] == [p["item_id"][:-1] + "2"] for p in d["pairs"])
    assert all(len(grades) == 3 for _, grades in d["judged"])  # judged with every grade
    assert d["val_in_tuning_split"] is None or 0 <= d["val_in_tuning_split"] <= 10
    again = hd.load_data(tmp_path, val_queries=10, max_pairs=100, catalog_limit=None, seed=0)
    assert again["pairs"] == d["pairs"] and again["judged"] == d["judged"]
