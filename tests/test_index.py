"""Catalog embedding on 1 and 2 ranks, FAISS against exact search, search CLI, rerank eval, plot."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clicktower.launcher.retrieval.embedding import rank_slice
from clicktower.launcher.retrieval.faiss_index import build_faiss_index, load_embedding_shards
from clicktower.launcher.retrieval.metrics import exact_topk

from conftest import MINILM, clicktower
from dist_launch import accelerate_launch


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory, synth_dir) -> Path:
    """The first 60 products of the synthetic catalog (the pretrained MiniLM embeds them fast)."""
    path = tmp_path_factory.mktemp("catalog") / "catalog.jsonl"
    lines = (synth_dir / "catalog.jsonl").read_text().splitlines()[:60]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.unit
@pytest.mark.parametrize("rows, world", [(10, 3), (2, 4), (0, 2), (7, 1)])
def test_rank_slices_cover_every_row_once(rows, world):
    covered = [i for r in range(world) for i in range(rows)[rank_slice(rows, r, world)]]
    assert covered == list(range(rows))


@pytest.mark.unit
def test_flat_faiss_equals_exact_search():
    rng = np.random.default_rng(0)
    catalog = rng.standard_normal((500, 24)).astype(np.float32)
    queries = rng.standard_normal((40, 24)).astype(np.float32)
    scores, rows = build_faiss_index(catalog, "flat").search(queries, 10)
    exact_scores, exact_rows = exact_topk(torch.from_numpy(queries), torch.from_numpy(catalog), 10)
    assert np.array_equal(rows, exact_rows.numpy())
    assert np.allclose(scores, exact_scores.numpy(), atol=1e-4)


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_most_exact_neighbours(kind):
    rng = np.random.default_rng(1)
    catalog = rng.standard_normal((2000, 16)).astype(np.float32)
    catalog /= np.linalg.norm(catalog, axis=1, keepdims=True)
    queries = catalog[:50] + 0.05 * rng.standard_normal((50, 16)).astype(np.float32)
    _, rows = build_faiss_index(catalog, kind).search(queries, 10)
    _, exact = exact_topk(torch.from_numpy(queries), torch.from_numpy(catalog), 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact.tolist())])
    assert overlap > 0.6


@pytest.mark.e2e
@pytest.mark.slow
def test_embed_on_two_ranks_equals_one_rank_and_search(small_catalog, tmp_path):
    single = tmp_path / "single"
    result = clicktower("embed", "--model", MINILM, "--catalog", str(small_catalog), "--out", str(single))
    assert result.returncode == 0, result.stderr
    double = tmp_path / "double"
    # Two gloo processes on the CPU (configs/accelerate/cpu_2proc_ddp.yaml, a free port).
    result = accelerate_launch("cpu_2proc_ddp", ["-m", "clicktower.launcher.index",
                                             "--model", MINILM, "--catalog", str(small_catalog), "--out", str(double)])
    assert result.returncode == 0, result.stderr[-3000:]
    one, one_ids = load_embedding_shards(single, 1)
    two, two_ids = load_embedding_shards(double, 2)
    assert one_ids == two_ids and len(one_ids) == 60
    assert np.allclose(one, two, atol=1e-5)
    assert json.loads((double / "index.json").read_text())["num_items"] == 60

    result = clicktower("search", "--index", str(double), "--json", "-k", "5", "cordless drill")
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout.strip().splitlines()[-1])["hits"]
    assert len(hits) == 5 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert "Drill" in hits[0]["item_text"]
    table = clicktower("search", "--index", str(double), "cordless", "drill")
    assert table.returncode == 0 and table.stdout.count("\n") == 11


@pytest.mark.e2e
def test_search_without_index_is_a_user_error(tmp_path):
    result = clicktower("search", "--index", str(tmp_path), "drill")
    assert result.returncode == 2 and "no index.json" in result.stderr


@pytest.mark.e2e
def test_rerank_mode_orders_only_judged_items(small_catalog, tmp_path):
    ids = [json.loads(line)["item_id"] for line in small_catalog.read_text().splitlines()]
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"query": "drill", "relevance": {ids[1]: 3, ids[0]: 0, "NOT-IN-CATALOG": 2}}) + "\n")
    result = clicktower("eval", "--model", MINILM, "--queries", str(queries), "--catalog", str(small_catalog),
                        "--mode", "rerank", "--per-query", str(tmp_path / "pq.jsonl"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["mode"] == "rerank" and summary["num_queries"] == 1
    ranked = json.loads((tmp_path / "pq.jsonl").read_text())["top10"]
    assert sorted(ranked) == sorted([ids[0], ids[1]])


@pytest.mark.e2e
def test_plot_writes_a_png(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with (run_dir / "metrics.jsonl").open("w") as fh:
        for step in range(1, 11):
            fh.write(json.dumps({"step": step, "loss": 3.0 / step, "temperature": 0.05, "pairs_per_sec": 100.0}) + "\n")
        fh.write(json.dumps({"step": 10, "eval/recall@10": 0.5, "eval/ndcg@10": 0.4}) + "\n")
    result = clicktower("plot", str(run_dir))
    assert result.returncode == 0, result.stderr
    png = run_dir / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    missing = clicktower("plot", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "no metrics file" in missing.stderr
