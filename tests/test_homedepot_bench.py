"""Pure logic of ``benchmarks/homedepot.py``: the three-way split by query, the exclusion lists,
the equal-time step estimate, the bootstrap over seed-averaged per-query metrics, and the report.

The benchmark itself (real data, ~50 minutes) is not part of the tests; these check the pieces
its claims rest on, on small hand-made inputs, without training any model.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import load_benchmark

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def hd():
    return load_benchmark("homedepot")


def metrics(value: float) -> dict[str, float]:
    return {key: value for key in ("recall@10", "recall@100", "mrr@10", "ndcg@10")}


def write_data(folder: Path, queries: int = 40) -> None:
    """train.csv: every query has a click (3.0), a graded pair (2.33) and a non-click (1.0);
    catalog.csv: those items plus a colour variant of each click and 20 unrelated items."""
    rows, catalog = [], []
    for q in range(queries):
        for item, grade in enumerate((3.0, 2.33, 1.0)):
            title = f"Brand{q} Widget{item} 2-Light Black Lantern"
            rows.append({"id": len(rows), "product_uid": f"{q}-{item}", "product_title": title,
                         "search_term": f"query {q}", "relevance": grade})
            catalog.append({"product_uid": f"{q}-{item}", "product_title": title})
        catalog.append({"product_uid": f"{q}-v", "product_title": f"Brand{q} Widget0 3-Light White Lantern"})
    catalog += [{"product_uid": f"x{i}", "product_title": f"Other thing {i}"} for i in range(20)]
    for name, table in (("train.csv", rows), ("catalog.csv", catalog)):
        with open(folder / name, "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)


def args_for(hd, folder: Path, *extra: str):
    return hd.parse_args(["--out", str(folder / "out"), "--data", str(folder), "--reported-queries", "10",
                          "--tuning-queries", "5", "--tuning-distractors", "7", "--batch-size", "4",
                          "--evals-per-run", "2", *extra])


# --- split -----------------------------------------------------------------------------------

def test_split_is_three_way_by_query_disjoint_and_reproducible(hd):
    by_query = {f"q{i}": [{"item_id": str(i), "item_text": "t", "relevance": 3.0 if i % 4 else 1.0}]
                for i in range(100)}
    split = hd.split_queries(by_query, reported=30, tuning=10, seed=3)
    reported, tuning, train = (set(split[k]) for k in ("reported", "tuning", "train"))
    assert (len(reported), len(tuning), len(train)) == (30, 10, 60)
    assert not reported & tuning and not reported & train and not tuning & train
    assert reported | tuning | train == set(by_query)
    clicked = {q for q, rows in by_query.items() if rows[0]["relevance"] >= hd.POSITIVE}
    assert reported <= clicked and tuning <= clicked  # evaluated queries have something to find
    assert hd.split_queries(by_query, 30, 10, seed=3) == split
    assert hd.split_queries(by_query, 30, 10, seed=4) != split
    with pytest.raises(ValueError):
        hd.split_queries(by_query, 70, 10, seed=0)  # only 75 queries have a click


def test_load_data_trains_only_on_training_queries(hd, tmp_path):
    write_data(tmp_path)
    d = hd.load_data(args_for(hd, tmp_path))
    reported, tuning = {q for q, _ in d["reported"]}, {q for q, _ in d["tuning"]}
    train = {p["query"] for p in d["pairs"]}
    assert len(reported) == 10 and len(tuning) == 5 and not train & (reported | tuning)
    assert d["split"] == {"reported": 10, "tuning": 5, "train": 25}
    assert len(d["pairs"]) == 24  # 25 clicks, trimmed to whole blocks of batch x evaluations (8)
    assert all(p["item_id"].endswith("-0") and p["weight"] == 1.0 for p in d["pairs"])  # clicks only
    assert all(len(grades) == 3 for _, grades in d["reported"])  # judged with every grade
    tuning_ids = {i for i, _ in d["tuning_catalog"]}
    judged = {i for _, grades in d["tuning"] for i in grades}
    assert judged <= tuning_ids and len(tuning_ids) == len(judged) + 7
    again = hd.load_data(args_for(hd, tmp_path))
    assert again["pairs"] == d["pairs"] and again["reported"] == d["reported"]


def test_graded_positives_enter_with_their_weight(hd, tmp_path):
    write_data(tmp_path)
    d = hd.load_data(args_for(hd, tmp_path, "--graded-weight", "0.3"))
    graded = [p for p in d["pairs"] if p["item_id"].endswith("-1")]
    assert graded and all(p["weight"] == 0.3 for p in graded)
    assert not any(p["item_id"].endswith("-2") for p in d["pairs"])  # relevance 1.0 never
    assert all(p["item_id"] not in p["exclude_ids"] for p in d["pairs"])


# --- exclusions ------------------------------------------------------------------------------

def test_variant_key_ignores_sizes_colours_and_numbers(hd):
    key = hd.variant_key
    assert key("Hampton Bay 1-Light Black Outdoor Wall Lantern") == key("Hampton Bay 3-Light White Outdoor Wall "
                                                                         "Lantern")
    assert key("Crown Bolt 1/2 in. x 6 in. Hex Lag Screw") == key("Crown Bolt 3/8 in. x 4 in. Hex Lag Screw")
    assert key("Frigidaire 18 cu. ft. Top Freezer Fridge") == key("Frigidaire 20 cu. ft. Top Freezer Fridge")
    assert key("Hampton Bay Wall Lantern") != key("Hampton Bay Ceiling Fan")
    # The same pattern, as clicktower mine applies it, gives the same key.
    import re
    assert key("A 2-Pack  RED  Hose") == " ".join(re.sub(hd.VARIANT_KEY, " ", "A 2-Pack  RED  Hose",
                                                         flags=re.IGNORECASE).lower().split())


def test_exclusions_are_judged_not_clicked_and_variants_never_the_positive(hd):
    catalog = [("1", "Acme 2-Light Black Lantern"), ("2", "Acme 3-Light White Lantern"),
               ("3", "Acme Lantern Bracket"), ("4", "Acme 4-Light Bronze Lantern"),
               ("5", "Zeta Hose"), ("6", "Acme 5-Light Red Lantern")]
    groups, titles = hd.variant_groups(catalog), dict(catalog)
    rows = [{"item_id": "1", "item_text": titles["1"], "relevance": 3.0},
            {"item_id": "4", "item_text": titles["4"], "relevance": 2.67},   # a click that is a variant
            {"item_id": "3", "item_text": titles["3"], "relevance": 2.33},   # judged, not clicked
            {"item_id": "5", "item_text": titles["5"], "relevance": 1.0}]    # judged, not clicked
    exclude = hd.query_exclusions(rows, groups, titles)
    assert exclude[:2] == ["3", "5"]  # the judged-not-clicked items first
    assert set(exclude) == {"3", "5", "2", "6"}  # + the unjudged variants of the clicks
    assert "1" not in exclude and "4" not in exclude  # never a click (the query's positives)
    pairs = hd.build_pairs({"q": rows}, ["q"], groups, titles, graded_weight=0.5, seed=0)
    by_item = {p["item_id"]: p for p in pairs}
    assert set(by_item) == {"1", "4", "3"}
    assert by_item["3"]["weight"] == 0.5 and "3" not in by_item["3"]["exclude_ids"]  # not its own positive
    assert set(by_item["1"]["exclude_ids"]) == {"3", "5", "2", "6"}
    assert all(p["item_id"] not in p["exclude_ids"] for p in pairs)


def test_exclusions_are_capped(hd):
    catalog = [(str(i), f"Acme {i}-Light Lantern") for i in range(200)]
    rows = [{"item_id": "0", "item_text": "Acme 0-Light Lantern", "relevance": 3.0}]
    exclude = hd.query_exclusions(rows, hd.variant_groups(catalog), dict(catalog))
    assert len(exclude) == hd.MAX_EXCLUDE and "0" not in exclude


# --- equal time and throughput ---------------------------------------------------------------

def test_equal_time_steps_fill_the_budget_after_overhead_and_mining(hd):
    # Reference: 40 steps of 2 s in 100 s: 20 s fixed overhead (start-up, tuning evaluations).
    reference = {"train_seconds": 100.0, "steps": 40, "step_seconds": 2.0}
    assert hd.equal_time_steps(150.0, 0.0, reference, evals=2) == 64  # (150 - 20) / 2 = 65 -> 64
    assert hd.equal_time_steps(150.0, 10.0, reference, evals=2) == 60  # mining counts
    assert hd.equal_time_steps(150.0, 10.0, reference, evals=7) == 56  # the last step is evaluated
    assert hd.equal_time_steps(10.0, 0.0, reference, evals=3) == 3  # at least one step per evaluation
    # The reference itself is reproduced: its own time gives its own steps.
    assert hd.equal_time_steps(100.0, 0.0, reference, evals=2) == 40


def test_run_throughput_leaves_out_first_step_and_evaluation_windows(hd, tmp_path):
    records = [{"step": 1, "pairs_per_sec": 4.0, "logit_scale": 20.0}]  # 16 s: first step
    records += [{"step": s, "pairs_per_sec": 32.0, "logit_scale": 20.0} for s in (2, 3, 4)]  # 2 s each
    records.append({"step": 4, "eval/ndcg@10": 0.5, "eval/recall@10": 0.6})
    records.append({"step": 5, "pairs_per_sec": 2.0, "logit_scale": 21.0})  # holds the evaluation
    records.append({"step": 6, "pairs_per_sec": 32.0, "logit_scale": 22.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = hd.run_throughput(tmp_path, batch_size=64)
    assert figures["steps"] == 6 and figures["pairs_seen"] == 384
    assert figures["step_seconds"] == 2.0 and figures["pairs_per_sec"] == 32.0
    assert figures["final_logit_scale"] == 22.0
    assert figures["tuning_evals"] == [{"step": 4, "ndcg@10": 0.5, "recall@10": 0.6}]


# --- bootstrap over seeds --------------------------------------------------------------------

def test_bootstrap_of_a_constant_difference_is_that_difference(hd):
    # Every query gains exactly 0.25; the query without a relevant item (None) is skipped.
    first = [metrics(0.75), metrics(0.5), None, metrics(1.0)]
    second = [metrics(0.5), metrics(0.25), None, metrics(0.75)]
    assert hd.paired_bootstrap(first, second, resamples=200) == {k: [0.25, 0.25] for k in hd.METRICS}


def test_bootstrap_interval_brackets_the_mean_and_is_paired(hd):
    # Large per-query spread shared by both, small consistent gain: pairing removes the spread.
    base = [0.1 * (i % 10) for i in range(200)]
    first = [metrics(v + 0.02 + (0.01 if i % 2 else -0.01)) for i, v in enumerate(base)]
    second = [metrics(v) for v in base]
    low, high = hd.paired_bootstrap(first, second, resamples=500)["mrr@10"]
    assert 0.0 < low <= 0.02 <= high < 0.04
    assert hd.paired_bootstrap(second, first, resamples=500)["mrr@10"][1] < 0


def test_bootstrap_runs_over_seed_averaged_per_query_metrics(hd):
    # Seed 0 gains 0.1 on every query, seed 1 loses 0.05: averaged over seeds, a constant +0.025.
    base = [0.1 * (i % 7) for i in range(50)]
    st = [[metrics(v) for v in base], [metrics(v + 0.01) for v in base]]
    ct = [[metrics(v + 0.1) for v in base], [metrics(v + 0.01 - 0.05) for v in base]]
    ct[0][3] = None  # no relevant item in one run: that query is left out for every system
    averaged_ct, averaged_st = hd.seed_average(ct), hd.seed_average(st)
    assert averaged_ct[3] is None and averaged_st[0]["recall@10"] == pytest.approx(0.005)
    low, high = hd.paired_bootstrap(averaged_ct, averaged_st, resamples=300)["ndcg@10"]
    assert low == high == pytest.approx(0.025, abs=1e-4)


def fake_runs(hd, folder: Path, gain: float, st_seconds: float = 100.0, ct_seconds: float = 99.0) -> dict:
    """Per-query files and run records: clicktower = ST + gain on every query."""
    runs = {"zero_shot": {"system": "zero_shot", "metrics": metrics(0.2)}}
    (folder / "per_query").mkdir(parents=True, exist_ok=True)
    for seed in (0, 1):
        base = [0.3 + 0.01 * (i % 5) + 0.02 * seed for i in range(40)]
        for name, system, values in ((f"st_s{seed}", hd.ST, base),
                                     (f"ct_time_s{seed}", hd.CT, [v + gain for v in base]),
                                     (f"ct_pairs_s{seed}", hd.CT, [v + gain / 2 for v in base])):
            with open(folder / "per_query" / f"{name}.jsonl", "w") as fh:
                fh.writelines(json.dumps({"query": f"q{i}", "metrics": metrics(v)}) + "\n"
                              for i, v in enumerate(values))
            seconds = st_seconds if system == hd.ST else ct_seconds
            runs[name] = {"system": system, "seed": seed, "metrics": metrics(sum(values) / len(values)),
                          "train": {"train_seconds": seconds, "time_seconds": seconds, "pairs_seen": 640,
                                    "steps": 10, "pairs_per_sec": 60.0 if system == hd.CT else 40.0,
                                    "effective_pairs_per_sec": 50.0 if system == hd.CT else 38.0}}
    return runs


def test_compare_reports_mean_std_deltas_and_intervals(hd, tmp_path):
    runs = fake_runs(hd, tmp_path, gain=0.02)
    comp = hd.compare(tmp_path, runs, "time", seeds=2)
    assert comp["runs"] == {hd.CT: ["ct_time_s0", "ct_time_s1"], hd.ST: ["st_s0", "st_s1"]}
    st_means = [runs["st_s0"]["metrics"]["recall@10"], runs["st_s1"]["metrics"]["recall@10"]]
    assert comp[hd.ST]["recall@10"]["mean"] == pytest.approx(sum(st_means) / 2, abs=1e-4)
    assert comp[hd.ST]["recall@10"]["std"] > 0
    assert comp["delta"] == {k: 0.02 for k in hd.METRICS}
    assert comp["delta_ci95"]["recall@10"] == [0.02, 0.02]
    assert comp["times"][1] == {"seed": 1, "st_seconds": 100.0, "ct_seconds": 99.0, "st_pairs_seen": 640,
                                "ct_pairs_seen": 640, "ct_steps": 10}
    pairs = hd.compare(tmp_path, runs, "pairs", seeds=1)
    assert pairs["seeds"] == [0] and pairs[hd.CT]["ndcg@10"]["std"] == 0.0


def test_not_won_lists_every_missed_target(hd, tmp_path):
    runs = fake_runs(hd, tmp_path, gain=0.05)
    won = hd.not_won(hd.compare(tmp_path, runs, "time", 2), hd.compare(tmp_path, runs, "pairs", 1),
                     hd.throughput(runs))
    assert won == []  # +0.05 everywhere, x1.5 throughput, on time
    runs = fake_runs(hd, tmp_path, gain=-0.01, ct_seconds=130.0)
    speed = hd.throughput(runs)
    assert speed["ratio"] == 1.5 and speed["effective_ratio"] == pytest.approx(50 / 38, abs=1e-3)
    misses = hd.not_won(hd.compare(tmp_path, runs, "time", 2), hd.compare(tmp_path, runs, "pairs", 1),
                        {**speed, "ratio": 1.2})
    text = "\n".join(misses)
    for expected in ("equal time: recall@10", "equal pairs: ndcg@10", "recall@10 gain's 95% interval",
                     "throughput x1.20", "moonshot", "equal time seed 1: clicktower trained 130 s"):
        assert expected in text


def test_write_tables_renders_both_comparisons_and_the_misses(hd, tmp_path):
    runs = fake_runs(hd, tmp_path, gain=-0.01)
    args = hd.parse_args(["--out", str(tmp_path), "--quick"])
    comp_time, comp_pairs = hd.compare(tmp_path, runs, "time", 2), hd.compare(tmp_path, runs, "pairs", 1)
    speed = hd.throughput(runs)
    results = {"command": "python benchmarks/homedepot.py --quick", "smoke": True,
               "data": {"train_pairs": 640, "available_pairs": 900, "distinct_queries": 200, "reported_queries": 40,
                        "tuning_queries": 30, "tuning_catalog_items": 300, "catalog_items": 2000,
                        "full_catalog_items": 54667, "pairs_with_exclusions": 600, "mean_exclusions_per_pair": 4.0},
               "settings": hd.settings(args, None), "runs": runs, "equal_time": comp_time,
               "equal_pairs": comp_pairs, "throughput": speed, "not_won": hd.not_won(comp_time, comp_pairs, speed),
               "machine": {"cpu": "test cpu", "cores": 2, "torch": "x", "torch_threads": 2,
                           "load_average_at_start": [0.5, 0, 0], "load_average_at_end": [1.5, 0, 0]},
               "phase_minutes": {"data_and_shards": 0.1, "train_st_s0": 1.0}, "total_minutes": 1.1}
    hd.write_tables(results, tmp_path / "results")
    md = (tmp_path / "results" / "homedepot.md").read_text()
    assert "## Equal training time (primary)" in md and "## Equal pairs" in md and "SMOKE RUN" in md
    assert "0.3100 ± " in md or " ± " in md  # mean ± std over the two seeds
    assert "## Where clicktower does not win" in md and "equal time: recall@10" in md
    assert "train_st_s0 1.0" in md and "0.5 before, 1.5 after" in md
    assert json.loads((tmp_path / "results" / "homedepot.json").read_text())["total_minutes"] == 1.1


# --- the clicktower config -------------------------------------------------------------------

def test_clicktower_overrides_are_a_valid_config(hd, tmp_path):
    from clicktower.launcher.engine.config import load_config

    args = hd.parse_args(["--out", str(tmp_path), "--mine-negatives", "2", "--evals-per-run", "2"])
    tuning = {"queries": str(tmp_path / "q.jsonl"), "catalog": str(tmp_path / "c.jsonl")}
    shards, run = tmp_path / "shards", tmp_path / "run"
    epoch = load_config(None, hd.clicktower_overrides(args, shards, run, 0, 220, True, tuning))
    assert epoch.train.epochs == 1 and epoch.train.max_steps is None
    assert epoch.eval.every_steps == 110 and epoch.optim.warmup_steps == 22
    assert epoch.model.learn_temperature and epoch.data.hard_negatives_per_query == 2
    timed = load_config(None, hd.clicktower_overrides(args, shards, run, 1, 300, False, tuning))
    assert timed.train.max_steps == 300 and timed.train.epochs is None and timed.train.seed == 1


def test_quick_fills_smoke_settings_but_keeps_explicit_ones(hd):
    args = hd.parse_args(["--out", "x", "--quick", "--max-pairs", "512"])
    assert args.max_pairs == 512 and args.catalog_limit == 500 and args.reported_queries == 50
    assert hd.parse_args(["--out", "x"]).catalog_limit is None


# --- the levers run (benchmarks/homedepot_levers.py) -----------------------------------------

@pytest.fixture(scope="module")
def levers(hd):
    import sys

    # homedepot_levers imports homedepot by name, as it does when run from benchmarks/.
    sys.modules.setdefault("homedepot", hd)
    return load_benchmark("homedepot_levers")


def test_each_arm_adds_only_its_lever_and_the_teacher_arms_read_one_negative(levers, hd, tmp_path):
    from clicktower.launcher.engine.config import load_config

    args = levers.parse_args(["--out", str(tmp_path), "--batch-size", "32", "--memory-warmup", "7"])
    tuning = {"queries": str(tmp_path / "q.jsonl"), "catalog": str(tmp_path / "c.jsonl")}
    configs = {arm: load_config(None, hd.clicktower_overrides(levers.arm_args(arm, args), tmp_path / "s",
                                                              tmp_path / "r", 0, 100, False, tuning))
               for arm in (*levers.LEVER_ARMS, "teacher_cost")}
    plain = configs["ct"].loss
    assert (plain.popularity_correction, plain.memory_size, plain.distill_weight) == ("none", 0, 0.0)
    assert configs["ct"].data.hard_negatives_per_query == 0
    assert configs["logq"].loss.popularity_correction == "logq" and configs["logq"].loss.memory_size == 0
    assert (configs["memory"].loss.memory_size, configs["memory"].loss.memory_warmup_steps) == (128, 7)
    assert configs["memory"].loss.popularity_correction == "none"
    for arm in ("teacher", "teacher_cost", "all"):
        assert configs[arm].loss.distill_weight == 1.0 and configs[arm].data.hard_negatives_per_query == 1
    every = configs["all"].loss
    assert every.popularity_correction == "logq" and every.memory_size == 128
    assert args.set == [] and args.mine_negatives == 0  # arm_args copies, never edits the run's args


def test_teacher_trains_only_on_the_training_queries_judgements(levers, hd, tmp_path):
    write_data(tmp_path)
    args = levers.parse_args(["--out", str(tmp_path / "out"), "--data", str(tmp_path), "--reported-queries", "10",
                              "--tuning-queries", "5", "--teacher-pairs", "60"])
    rows = levers.teacher_judgements(args)
    split = hd.split_queries(hd.read_judgements(tmp_path), 10, 5, 0)
    assert len(rows) == 60 and {r["query"] for r in rows} <= set(split["train"])
    assert {r["label"] for r in rows} == {1.0, 2.33, 3.0}  # every grade, the judged-irrelevant included
    assert levers.teacher_judgements(args) == rows


def test_budget_counts_mining_in_teacher_arms_and_the_teacher_only_when_asked(levers, tmp_path):
    bench = levers.LeverBench(levers.parse_args(["--out", str(tmp_path)]))
    bench.runs["st_s1"] = {"train": {"train_seconds": 300.0}}
    bench.mined = {"mining_seconds": 40.0}
    bench.teacher = {"cost_seconds": 250.0}
    assert bench.budget("ct", 1) == bench.budget("memory", 1) == (300.0, 0.0)
    assert bench.budget("teacher", 1) == bench.budget("all", 1) == (300.0, 40.0)
    assert bench.budget("teacher_cost", 1) == (300.0, 290.0)
    bench.reference["hard"] = {"train_seconds": 30.0, "steps": 10, "step_seconds": 1.0}  # 20 s overhead
    bench.arm("teacher_cost", 1)  # 300 - 290 - 20 < 0: nothing left to train, and nothing runs
    assert "no time left: 290 s of the 300 s budget" in bench.runs["teacher_cost_s1"]["skipped"]


def lever_runs(hd, folder: Path, gains: dict[str, float]) -> dict:
    """Per-query files and run records of ST and each arm (arm = ST + its gain on every query)."""
    runs = {}
    (folder / "per_query").mkdir(parents=True, exist_ok=True)
    for seed in (0, 1):
        base = [0.3 + 0.01 * (i % 5) + 0.02 * seed for i in range(40)]
        for arm, gain in {"st": 0.0, **gains}.items():
            values = [v + gain for v in base]
            with open(folder / "per_query" / f"{arm}_s{seed}.jsonl", "w") as fh:
                fh.writelines(json.dumps({"query": f"q{i}", "metrics": metrics(v)}) + "\n"
                              for i, v in enumerate(values))
            runs[f"{arm}_s{seed}"] = {"system": hd.ST if arm == "st" else hd.CT, "seed": seed,
                                      "metrics": metrics(sum(values) / len(values)),
                                      "train": {"train_seconds": 100.0, "steps": 10, "pairs_seen": 640,
                                                "budget_seconds": 100.0, "counted_before_seconds": 0.0}}
    return runs


def test_levers_report_says_which_lever_did_not_help_and_a_skipped_teacher_cost_row(levers, hd, tmp_path):
    runs = lever_runs(hd, tmp_path, {"ct": 0.01, "logq": 0.005, "memory": 0.01, "teacher": 0.04, "all": 0.03})
    for seed in (0, 1):
        runs[f"teacher_cost_s{seed}"] = {"system": hd.CT, "skipped": "no time left: 400 s of the 100 s budget"}
    comparisons = {arm: {"vs_st": levers.compare_arm(tmp_path, runs, arm, "st", 2),
                         "vs_ct": None if arm == "ct" else levers.compare_arm(tmp_path, runs, arm, "ct", 2)}
                   for arm in (*levers.LEVER_ARMS, "teacher_cost")}
    assert comparisons["teacher"]["vs_ct"]["delta"]["recall@10"] == pytest.approx(0.03)
    assert comparisons["teacher"]["vs_st"]["delta_ci95"]["ndcg@10"] == [0.04, 0.04]
    assert comparisons["teacher_cost"]["vs_st"] is None
    lines = levers.targets(comparisons, {"cost_seconds": 400.0})
    text = "\n".join(lines)
    assert "the best arm (`teacher`) is ahead of sentence-transformers on all four metrics" in text
    assert "Moonshot Recall@10 +0.03: +0.0400 (`teacher`): **met**" in text
    assert "With the teacher's cost counted (400 s): no time was left" in text
    assert "`logq` vs the recipe alone: Recall@10 -0.0050" in text and "did not help" in text
    assert "`memory` vs the recipe alone: Recall@10 +0.0000" in text
    assert "`teacher` vs the recipe alone: Recall@10 +0.0300 [+0.0300, +0.0300], nDCG@10 +0.0300: helped" in text


def test_levers_markdown_renders_every_arm_the_teacher_and_the_skipped_row(levers, hd, tmp_path):
    runs = lever_runs(hd, tmp_path, {"ct": 0.01, "logq": 0.0, "memory": -0.01, "teacher": 0.02, "all": 0.02})
    runs["st_s0"]["metrics"]["rerank"] = metrics(0.91)
    runs["ct_s0"]["metrics"]["rerank"] = metrics(0.92)
    runs["teacher_cost_s0"] = runs["teacher_cost_s1"] = {"system": hd.CT, "skipped": "no time left: 400 s"}
    comparisons = {arm: {"vs_st": levers.compare_arm(tmp_path, runs, arm, "st", 2),
                         "vs_ct": None if arm == "ct" else levers.compare_arm(tmp_path, runs, arm, "ct", 2)}
                   for arm in (*levers.LEVER_ARMS, "teacher_cost")}
    args = levers.parse_args(["--out", str(tmp_path)])
    teacher = {"pairs": 8192, "steps": 256, "lr": 5e-5, "train_seconds": 260.0, "cost_seconds": 400.0,
               "rerank": metrics(0.93)}
    results = {"command": "python benchmarks/homedepot_levers.py --out x", "smoke": False,
               "data": {"reported_queries": 40, "catalog_items": 54667, "train_pairs": 8192},
               "settings": {"batch_size": 64, "max_seq_length": 32, "lr": 5e-5, "seeds": 2, "memory_size": 256,
                            "teacher_margin": 0.0, "recipe": hd.CLICKTOWER_SPEED,
                            "arms": {a: levers.arm_overrides(a, args) for a in (*levers.LEVER_ARMS, "teacher_cost")}},
               "teacher": teacher, "mining": {"teacher_dropped": 900, "teacher_candidates": 16000,
                                              "mining_seconds": 60.0, "teacher_denoise_seconds": 80.0,
                                              "teacher_score_seconds": 60.0},
               "st": {k: hd.mean_std([runs[f"st_s{s}"]["metrics"][k] for s in (0, 1)]) for k in hd.METRICS},
               "comparisons": comparisons, "runs": runs, "targets": levers.targets(comparisons, teacher),
               "machine": {"cpu": "test cpu", "cores": 2, "torch": "x", "load_average_at_start": [0.5, 0, 0],
                           "load_average_at_end": [2.0, 0, 0]},
               "phase_minutes": {"teacher_train": 4.3}, "total_minutes": 90.0}
    md = levers.markdown(results)
    for arm_label in ("clicktower recipe (no lever)", "+ logq", "+ memory 256", "+ teacher (cost not counted)",
                      "+ teacher + logq + memory (cost not counted)"):
        assert f"| {arm_label} | 0." in md
    assert "| + teacher, its cost counted | not trained: see below |" in md
    assert "| teacher_cost_s0 | not trained: no time left: 400 s |" in md
    assert "teacher 0.9300, sentence-transformers seed 0 0.9100, clicktower recipe seed 0 0.9200" in md
    assert "dropped 900 of 16,000 candidates" in md and "`memory` vs the recipe alone: Recall@10 -0.0200" in md
    assert "Whole run 90.0 min" in md


def test_a_memory_only_run_filters_skips_the_teacher_and_judges_the_memory_target(levers, hd, tmp_path):
    """``--arms memory --memory-filter-margin``: the recipe runs too, no teacher is trained or
    reported, the memory arm carries the filter, and its own target (>= +0.005 Recall@10 at
    batch 32, <= 1.15x step time) is judged from both seeds' step times."""
    from clicktower.launcher.engine.config import load_config

    args = levers.parse_args(["--out", str(tmp_path), "--batch-size", "32", "--arms", "memory",
                              "--memory-filter-margin", "0.2", "--results-name", "hd_mem"])
    assert args.arms == ["ct", "memory"] and args.results_name == "hd_mem"
    tuning = {"queries": str(tmp_path / "q.jsonl"), "catalog": str(tmp_path / "c.jsonl")}
    cfg = load_config(None, hd.clicktower_overrides(levers.arm_args("memory", args), tmp_path / "s", tmp_path / "r",
                                                    0, 100, False, tuning))
    assert (cfg.loss.memory_size, cfg.loss.memory_filter_margin) == (128, 0.2)
    for bad in (["--arms", "ct,memroy"], ["--memory-filter-margin", "1.5"]):
        with pytest.raises(SystemExit):
            levers.parse_args(["--out", str(tmp_path), *bad])

    runs = lever_runs(hd, tmp_path, {"ct": 0.01, "memory": 0.017})
    for seed, (ct_step, memory_step) in enumerate(((1.0, 1.1), (1.0, 1.2))):
        runs[f"ct_s{seed}"]["train"]["step_seconds"] = ct_step
        runs[f"memory_s{seed}"]["train"]["step_seconds"] = memory_step
    comparisons = {arm: {"vs_st": levers.compare_arm(tmp_path, runs, arm, "st", 2),
                         "vs_ct": None if arm == "ct" else levers.compare_arm(tmp_path, runs, arm, "ct", 2)}
                   for arm in args.arms}
    ratio = levers.memory_step_ratio(runs, 2)
    assert ratio == pytest.approx(1.15)
    memory_time = {"ratio": ratio, "batch_size": 32, "memory_size": 128}
    text = "\n".join(levers.targets(comparisons, {}, memory_time))
    assert "With the teacher's cost counted" not in text  # no teacher arm ran
    assert "Memory of 128 (4 x batch 32): Recall@10 +0.0070 vs the recipe at 1.15x its step time" in text
    assert text.endswith("**met**.")
    slower = "\n".join(levers.targets(comparisons, {}, {**memory_time, "ratio": 1.2}))
    assert slower.endswith("**missed**.")  # the gain alone is not enough

    results = {"command": "python benchmarks/homedepot_levers.py --arms memory", "smoke": False,
               "data": {"reported_queries": 40, "catalog_items": 54667, "train_pairs": 8192},
               "settings": {"batch_size": 32, "max_seq_length": 32, "lr": 5e-5, "seeds": 2, "memory_size": 128,
                            "memory_filter_margin": 0.2, "recipe": hd.CLICKTOWER_SPEED,
                            "arms": {a: levers.arm_overrides(a, args) for a in args.arms}},
               "teacher": {}, "mining": {},
               "st": {k: hd.mean_std([runs[f"st_s{s}"]["metrics"][k] for s in (0, 1)]) for k in hd.METRICS},
               "comparisons": comparisons, "runs": runs, "targets": levers.targets(comparisons, {}, memory_time),
               "machine": {"cpu": "test cpu", "cores": 2, "torch": "x", "load_average_at_start": [0.5, 0, 0],
                           "load_average_at_end": [2.0, 0, 0]},
               "phase_minutes": {"train_ct_s0": 3.0}, "total_minutes": 60.0}
    md = levers.markdown(results)
    assert "| + memory 128 (filter margin 0.2) | 0." in md and "| clicktower recipe (no lever) | 0." in md
    assert "+ logq" not in md and "## The teacher" not in md
