"""The synthetic click-log generator: deterministic, realistic shape, held-out eval."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from clicktower.data.synth import generate

pytestmark = pytest.mark.unit


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    generate(tmp_path / "a", 1500, seed=3)
    generate(tmp_path / "b", 1500, seed=3)
    generate(tmp_path / "c", 1500, seed=4)
    for name in ("train.jsonl", "catalog.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_clicks_are_skewed_and_products_have_many_queries(synth_dir):
    train = _read(synth_dir / "train.jsonl")
    catalog = {r["item_id"]: r["item_text"] for r in _read(synth_dir / "catalog.jsonl")}
    assert len(train) == 2000 and len(catalog) == 240
    assert all(catalog[r["item_id"]] == r["item_text"] for r in train)
    clicks = Counter(r["item_id"] for r in train)
    counts = sorted(clicks.values(), reverse=True)
    # Zipf: the most popular product gets far more clicks than the median clicked product.
    assert counts[0] >= 10 * counts[len(counts) // 2]
    queries_per_item = Counter()
    for item, n in Counter((r["item_id"], r["query"]) for r in train).items():
        queries_per_item[item[0]] += 1
    assert max(queries_per_item.values()) >= 20  # many distinct queries click one product
    assert len({r["query"] for r in train}) > 1000


def test_eval_queries_are_held_out_and_graded(synth_dir):
    train_queries = {r["query"] for r in _read(synth_dir / "train.jsonl")}
    catalog = {r["item_id"] for r in _read(synth_dir / "catalog.jsonl")}
    rows = _read(synth_dir / "eval.jsonl")
    assert rows and not train_queries.intersection(r["query"] for r in rows)
    for row in rows:
        grades = row["relevance"]
        assert set(grades) <= catalog
        assert sorted(set(grades.values())) in ([1, 3], [1, 2, 3], [3], [2, 3])
        assert list(grades.values()).count(3) == 1


def test_training_signals_are_extra_fields_that_shard_and_leave_the_pairs_alone(tmp_path):
    """--hard-negatives K adds negs / grade / judged / teacher to each row (the inputs of the
    README's hard-negative section); the pairs, catalog and eval queries stay byte for byte."""
    from clicktower.data.shards import iter_shard, write_shards
    from clicktower.data.sources import FieldMap

    generate(tmp_path / "plain", 400, seed=3)
    generate(tmp_path / "rich", 400, seed=3, hard_negatives=2)
    plain = [json.loads(line) for line in (tmp_path / "plain" / "train.jsonl").read_text().splitlines()]
    rich = [json.loads(line) for line in (tmp_path / "rich" / "train.jsonl").read_text().splitlines()]
    assert [{k: r[k] for k in ("query", "item_id", "item_text")} for r in rich] == plain
    for name in ("catalog.jsonl", "eval.jsonl"):
        assert (tmp_path / "rich" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    texts = {json.loads(line)["item_id"]: json.loads(line)["item_text"]
             for line in (tmp_path / "plain" / "catalog.jsonl").read_text().splitlines()}
    assert sum(len(r["negs"]) == 2 for r in rich) > 0.9 * len(rich)
    for r in rich:
        ids = {n["item_id"] for n in r["negs"]}
        assert r["item_id"] not in ids | set(r["judged"]) and not ids & set(r["judged"])
        assert all(texts[n["item_id"]] == n["item_text"] for n in r["negs"])
        assert r["grade"] in (1, 2, 3) and len(r["teacher"]) == 1 + len(r["negs"])
        assert all(r["teacher"][0] > t for t in r["teacher"][1:])  # the teacher ranks the click first
    manifest = write_shards([str(tmp_path / "rich" / "train.jsonl")], str(tmp_path / "shards"),
                            FieldMap(hard_negatives="negs", weight="grade", exclude_ids="judged",
                                     teacher_scores="teacher"))
    sample = next(iter_shard(str(tmp_path / "shards" / manifest["shards"][0]["path"])))
    assert {"hard_negatives", "weight", "exclude_ids", "teacher_scores"} <= set(sample)
    with pytest.raises(ValueError, match="--hard-negatives"):
        generate(tmp_path / "bad", 10, hard_negatives=0)


def test_popularity_option_sets_the_zipf_exponent(tmp_path, capsys):
    """`clicktower synth --popularity zipf:S`: S = 0 is uniform clicks, a larger S a heavier
    head; a malformed law is a usage error."""
    from clicktower.launcher.commands.synth import main

    top = {}
    for s in ("0", "2"):
        assert main(["--out", str(tmp_path / s), "--pairs", "2000", "--items", "200", "--popularity", f"zipf:{s}"]) == 0
        rows = [json.loads(line) for line in (tmp_path / s / "train.jsonl").read_text().splitlines()]
        top[s] = Counter(r["item_id"] for r in rows).most_common(1)[0][1] / len(rows)
    assert top["0"] < 0.03 and top["2"] > 0.4
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--pairs", "10", "--popularity", "zipf:-1"])
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--pairs", "10", "--popularity", "pareto:1"])
