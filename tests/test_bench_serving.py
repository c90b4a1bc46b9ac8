"""Pure logic of ``benchmarks/bench_serving.py``: the Home Depot grid's settings and the targets
table read off its rows (old rows without ``rescore`` and new int8-rescored rows side by side).

The benchmark itself (real data, tens of minutes) is not part of the tests.
"""
from __future__ import annotations

import pytest

from conftest import load_benchmark

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_serving")


def test_grid_measures_both_rescoring_sources_at_every_dim(bench):
    grid = bench.homedepot_grid()
    int8 = {(s.dim, s.rescore_multiplier) for s in grid if s.precision == "ubinary" and s.rescore == "int8"}
    assert int8 == {(d, m) for d in bench.DIMS for m in bench.INT8_RESCORE_SWEEP}
    bits = {(s.dim, s.rescore_multiplier) for s in grid if s.precision == "ubinary" and s.rescore == "bits"}
    assert {(d, 4) for d in bench.DIMS} <= bits and len(set(map(repr, grid))) == len(grid)


def test_dims_grid_is_float32_and_int8_flat_at_every_dim_and_the_caption_names_the_projection(bench):
    grid = bench.homedepot_grid("dims")
    assert {(s.dim, s.precision, s.index) for s in grid} == {(d, p, "flat") for d in bench.DIMS
                                                              for p in ("float32", "int8")}
    summary = {"pairs_seen": 640, "steps": 10, "batch": 64, "lr": 5e-5, "matryoshka_dims": None,
               "matryoshka_weights": None, "projection": "384, pca init", "seed": 1}
    caption = bench._models_trained({"training": {"m": summary}})
    assert "(length 32, final/ reported): m 640 pairs (10 steps of 64, lr 5e-05, seed 1, projection 384, pca init)" \
        in caption


def test_targets_table_keeps_bits_and_int8_rescoring_apart(bench):
    def row(dim, precision, recall, multiplier=None, rescore=None):
        out = {"dim": dim, "precision": precision, "index": "flat", "recall@10": recall}
        if multiplier is not None:
            out["rescore_multiplier"] = multiplier
        if rescore is not None:
            out["rescore"] = rescore
        return out

    rows = [row(384, "float32", 0.40), row(384, "int8", 0.401), row(128, "float32", 0.35), row(128, "int8", 0.35),
            row(384, "ubinary", 0.37, 4),  # a row from before --rescore: the bits
            row(384, "ubinary", 0.395, 4, "int8"), row(384, "ubinary", 0.399, 10, "int8"),
            row(128, "ubinary", 0.30, 4, "bits")]
    table = bench._homedepot_targets({"models": ["m"], "grid": {"m": rows}})
    line384 = next(line for line in table if line.startswith("| m | 384 |"))
    line128 = next(line for line in table if line.startswith("| m | 128 |"))
    assert line384.endswith("| +0.0010 | - / -0.0300 / - / - / - | -0.0050 / -0.0010 / - |")
    assert "| -0.0500 |" in line128 and line128.endswith("| - / -0.0500 / - / - / - | - / - / - |")


def test_synthetic_rescore_grid_starts_from_exact_search_and_has_both_sources(bench):
    from clicktower.launcher.retrieval.serving import ServingSettings

    grid = bench.synthetic_grid("rescore")
    assert grid[0] == (ServingSettings(), [{}])  # flat float32: the exact baseline every row is held against
    assert {built.rescore for built, _ in grid[1:]} == {"bits", "int8"}
    assert all(built.precision == "ubinary" for built, _ in grid[1:])
