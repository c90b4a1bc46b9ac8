"""Pure logic of ``benchmarks/bench_levers.py``: the verdicts its results page states against
issue 28's targets (each half of the memory target on its own; the note that fits the encoder
the run trained) and re-rendering a finished run's page.

The benchmark itself (training runs, tens of minutes) is not part of the tests.
"""
from __future__ import annotations

import json

import pytest

from conftest import load_benchmark

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_levers")


def _arm(recall, head, tail, pairs_per_sec):
    return {"all/recall@10": recall, "head/recall@10": head, "tail/recall@10": tail, "pairs_per_sec": pairs_per_sec,
            "all/num_queries": 4.0, "head/num_queries": 2.0, "tail/num_queries": 2.0}


def _report(config, memory_recall, memory_pps, filtered=None):
    arms = {"baseline": _arm(0.80, 0.90, 0.70, 20.0), "logq": _arm(0.81, 0.895, 0.725, 20.0),
            "memory 4xB": _arm(memory_recall, 0.90, 0.70, memory_pps)}
    if filtered is not None:
        arms["memory 4xB filtered"] = _arm(filtered, 0.90, 0.70, 19.0)
    return {"machine": "test", "load_1min_before": 0.5, "load_1min_after": 1.5, "wall_s": 10.0,
            "settings": {"pairs": 100, "items": 10, "zipf": 1.2, "eval_queries": 4, "head_items": 2,
                         "config": config, "batch_size": 32, "steps": 5, "seeds": "0"},
            "runs": {arm: {"0": m} for arm, m in arms.items()}, "mean": arms,
            "loss_only_s": {"no memory": 0.001, "memory 4xB": 0.0012}, "commands": ["clicktower synth ..."]}


def test_memory_verdict_states_quality_and_step_time_apart(bench):
    report = _report("configs/demo.yaml", memory_recall=0.79, memory_pps=21.0)
    lines = bench.verdicts(report["mean"], report["settings"], (0.5, 1.5))
    memory = next(line for line in lines if line.startswith("- Memory 4xB"))
    assert "Recall@10 -0.0100 (target >= +0.005): **not met**" in memory
    assert "step time 0.95x the baseline's (target <= 1.15x): met." in memory
    logq = [line for line in lines if line.startswith("- logQ")]
    assert "+0.0250 (target >= +0.02): met." in logq[0] and "+0.0050 (target <= 0.01): met." in logq[1]
    slow = _report("configs/demo.yaml", memory_recall=0.81, memory_pps=10.0)
    memory = next(line for line in bench.verdicts(slow["mean"], slow["settings"], (0.5, 1.5))
                  if line.startswith("- Memory 4xB"))
    assert "(target >= +0.005): met;" in memory and "2.00x the baseline's (target <= 1.15x): **not met**." in memory


def test_the_filtered_memory_gets_its_own_verdict_and_timing(bench):
    report = _report("configs/demo.yaml", memory_recall=0.70, memory_pps=21.0, filtered=0.806)
    report["loss_only_s"]["memory 4xB filtered"] = 0.0014
    lines = bench.verdicts(report["mean"], report["settings"], (0.5, 1.5))
    filtered = next(line for line in lines if line.startswith("- Memory 4xB filtered"))
    assert "Recall@10 +0.0060 (target >= +0.005): met; step time 1.05x" in filtered
    assert any("changes the memory's Recall@10 by +0.1060" in line for line in lines)
    page = bench.markdown(report)
    assert "1.40 ms with them filtered (1.40x)" in page
    assert "with them filtered" not in bench.markdown(_report("configs/demo.yaml", 0.79, 21.0))  # older runs


def test_the_notes_describe_the_encoder_and_load_of_the_run(bench):
    tiny = _report("configs/tiny.yaml", 0.79, 20.0)
    pretrained = _report("configs/demo.yaml", 0.79, 20.0)
    tiny_page, pretrained_page = bench.markdown(tiny), bench.markdown(pretrained)
    assert "randomly initialised" in tiny_page and "randomly initialised" not in pretrained_page
    assert "pretrained encoder" in pretrained_page and "pretrained encoder" not in tiny_page
    assert bench.randomly_initialised("configs/tiny.yaml") and not bench.randomly_initialised("configs/demo.yaml")
    assert "1-min load 0.5 before the runs, 1.5 after" in pretrained_page


def test_render_writes_the_page_of_a_finished_run(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps(_report("configs/demo.yaml", 0.79, 21.0)))
    monkeypatch.setattr("sys.argv", ["bench_levers.py", "--out", str(tmp_path / "unused"), "--render", str(saved),
                                     "--results-name", "levers_x"])
    bench.main()
    page = (tmp_path / "results/levers_x.md").read_text()
    assert page == bench.markdown(json.loads(saved.read_text())) and page in capsys.readouterr().out
    assert json.loads((tmp_path / "results/levers_x.json").read_text()) == json.loads(saved.read_text())
    assert not (tmp_path / "unused").exists()  # rendering runs nothing
