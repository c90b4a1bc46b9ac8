"""Serving settings (``launcher/retrieval/serving.py``): a Matryoshka prefix, float16 / int8 /
ubinary vectors and FAISS indexes against exact search on planted neighbours; the settings
recorded in an index folder and applied by ``clicktower search`` / ``eval --index``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clicktower.launcher.retrieval.serving import (ServingSettings, binarize, build_index, index_bytes, overlap_at_k,
                                                   parse_index, prepare, search_index)

from clicktower.launcher.retrieval.evaluation import evaluate
from clicktower.launcher.retrieval.faiss_index import SearchIndex

from conftest import MINILM, clicktower

DIM = 64


def planted(n: int = 4000, queries: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random unit vectors; each query has 10 planted neighbours at decreasing similarity.
    Returns (catalog, queries, exact top-10 rows)."""
    rng = np.random.default_rng(seed)
    catalog = rng.standard_normal((n, DIM)).astype(np.float32)
    q = rng.standard_normal((queries, DIM)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for i in range(queries):
        for j in range(10):
            catalog[i * 10 + j] = q[i] + (0.3 + 0.1 * j) * rng.standard_normal(DIM) / np.sqrt(DIM)
    catalog /= np.linalg.norm(catalog, axis=1, keepdims=True)
    return catalog, q, np.argsort(-(q @ catalog.T), axis=1)[:, :10]


@pytest.mark.unit
def test_prefix_is_renormalised_and_the_whole_embedding_is_untouched():
    catalog, _, _ = planted(100, 2)
    assert prepare(catalog, None) is not None and np.array_equal(prepare(catalog, DIM), catalog)
    cut = prepare(catalog, 16)
    assert cut.shape == (100, 16) and np.allclose(np.linalg.norm(cut, axis=1), 1, atol=1e-6)
    assert np.allclose(cut, catalog[:, :16] / np.linalg.norm(catalog[:, :16], axis=1, keepdims=True))
    with pytest.raises(ValueError, match="larger"):
        prepare(catalog, DIM + 1)


@pytest.mark.unit
@pytest.mark.parametrize("spec, ok", [("flat", ()), ("ivf-pq:64,8", (64, 8)), ("hnsw:16", (16,)), ("hnsw", ()),
                                      ("ivf", ()), ("ivf-pq:64", None), ("hnsw:x", None), ("lsh", None),
                                      ("flat:3", None), ("ivf-pq:0,8", None)])
def test_index_specs(spec, ok):
    if ok is None:
        with pytest.raises(ValueError):
            parse_index(spec)
    else:
        assert parse_index(spec)[1] == ok


@pytest.mark.unit
def test_settings_validation_and_metadata_round_trip():
    for bad in (dict(precision="int4"), dict(index="ivf-pq:8,4", precision="int8"), dict(dim=0),
                dict(index="ivf", precision="ubinary"), dict(rescore_multiplier=0),
                dict(precision="ubinary", rescore="int4"), dict(precision="int8", rescore="int8")):
        with pytest.raises(ValueError):
            ServingSettings(**bad)
    s = ServingSettings(dim=32, precision="ubinary", index="hnsw:8", rescore_multiplier=3, rescore="int8")
    assert ServingSettings.from_meta(json.loads(json.dumps({"serving": s.to_meta()}))) == s
    # An index folder from before the settings: its kind, full size, float32.
    assert ServingSettings.from_meta({"kind": "hnsw"}) == ServingSettings(index="hnsw")


@pytest.mark.unit
def test_flat_float32_is_exact_and_quantised_flat_indexes_cost_their_bytes():
    catalog, q, exact = planted()
    scores, rows = search_index(build_index(catalog, ServingSettings()), ServingSettings(), q, 10)
    assert np.array_equal(rows, exact)
    assert np.allclose(scores, np.take_along_axis(q @ catalog.T, exact, 1), atol=1e-5)
    per_item = {}
    for precision in ("float32", "float16", "int8", "ubinary"):
        settings = ServingSettings(precision=precision)
        index = build_index(catalog, settings)
        _, rows = search_index(index, settings, q, 10)
        per_item[precision] = index_bytes(index) / len(catalog)
        assert overlap_at_k(rows, exact) >= {"float32": 1.0, "float16": 0.99, "int8": 0.95, "ubinary": 0.75}[precision]
    assert per_item["float32"] == pytest.approx(4 * DIM, rel=0.01)
    assert per_item["float16"] == pytest.approx(2 * DIM, rel=0.01)
    assert per_item["int8"] == pytest.approx(DIM, rel=0.02)
    assert per_item["ubinary"] == pytest.approx(DIM / 8, rel=0.02)


@pytest.mark.unit
def test_int8_ranges_are_calibrated_on_the_sample():
    """int8 maps each dimension's range, the min and max over the seeded training sample, to
    256 levels (FAISS's SQ8, decoded against the float query)."""
    import faiss

    catalog, q, exact = planted()
    settings = ServingSettings(precision="int8", train_sample=500)
    index = build_index(catalog, settings, seed=3)
    sample = catalog[np.sort(np.random.default_rng(3).choice(len(catalog), 500, replace=False))]
    trained = faiss.vector_to_array(index.sq.trained).reshape(2, DIM)
    assert np.allclose(trained[0], sample.min(0)) and np.allclose(trained[1], sample.max(0) - sample.min(0))
    assert not np.allclose(trained[0], catalog.min(0))  # the sample's range, not the catalog's
    assert overlap_at_k(search_index(index, settings, q, 10)[1], exact) >= 0.95


@pytest.mark.unit
def test_ubinary_rescoring_reorders_candidates_by_the_float_query():
    catalog, q, exact = planted()
    plain = ServingSettings(precision="ubinary", rescore_multiplier=1)
    wide = ServingSettings(precision="ubinary", rescore_multiplier=8)
    index = build_index(catalog, plain)
    scores, rows = search_index(index, wide, q, 10)
    bits = np.unpackbits(binarize(catalog), axis=1).astype(np.float32)
    assert np.allclose(scores, np.einsum("qd,qkd->qk", q, bits[rows]), atol=1e-5)  # float query x bits
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # More candidates rescored: more of the exact top 10 found.
    assert overlap_at_k(rows, exact) > overlap_at_k(search_index(index, plain, q, 10)[1], exact)


@pytest.mark.unit
def test_ubinary_rescored_against_int8_vectors_kept_apart():
    """rescore="int8": the Hamming candidates are rescored by the float query against int8
    codes calibrated on the sample (not their bits); memory holds only the bits."""
    from clicktower.launcher.retrieval.serving import RescoredBinaryIndex, int8_codes, int8_ranges, rescore_bytes

    catalog, q, exact = planted()
    bits_settings = ServingSettings(precision="ubinary", rescore_multiplier=4)
    int8_settings = ServingSettings(precision="ubinary", rescore_multiplier=4, rescore="int8", train_sample=1000)
    index = build_index(catalog, int8_settings, seed=2)
    assert isinstance(index, RescoredBinaryIndex)
    sample = catalog[np.sort(np.random.default_rng(2).choice(len(catalog), 1000, replace=False))]
    low, step = int8_ranges(sample)
    assert np.allclose(index.low, sample.min(0)) and np.allclose(index.low + 255 * index.step, sample.max(0))
    assert np.array_equal(index.codes, int8_codes(catalog, low, step))
    scores, rows = search_index(index, int8_settings, q, 10)
    decoded = low + int8_codes(catalog, low, step).astype(np.float32) * step
    inside = np.all((catalog >= index.low) & (catalog <= index.low + 255 * index.step), axis=1)
    assert inside.sum() > 1000 and np.all(np.abs(decoded - catalog)[inside] <= step / 2 + 1e-6)  # half a level
    assert np.allclose(scores, np.einsum("qd,qkd->qk", q, decoded[rows]), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # Rescoring picks among the Hamming top 10 x 4 only, and orders them better than the bits.
    candidates = index.binary.search(binarize(q), 40)[1]
    assert all(set(r) <= set(c) for r, c in zip(rows.tolist(), candidates.tolist()))
    plain = build_index(catalog, bits_settings)
    assert overlap_at_k(rows, exact) > overlap_at_k(search_index(plain, bits_settings, q, 10)[1], exact)
    assert index_bytes(index) == index_bytes(plain)  # in memory: the bits alone
    assert rescore_bytes(index) == len(catalog) * DIM + 2 * 4 * DIM and rescore_bytes(plain) == 0


@pytest.mark.unit
def test_int8_rescoring_vectors_are_saved_beside_the_index_and_memory_mapped(tmp_path):
    from clicktower.launcher.retrieval.serving import read_index, rescore_paths, write_index

    catalog, q, _ = planted(500, 5)
    settings = ServingSettings(precision="ubinary", rescore="int8")
    index = build_index(catalog, settings)
    path = str(tmp_path / "index.faiss")
    write_index(index, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["index.faiss", *(Path(p).name for p in rescore_paths(path))])  # no temporary file left
    loaded = read_index(path, settings)
    assert isinstance(loaded.codes, np.memmap) and np.array_equal(loaded.codes, index.codes)
    before, after = search_index(index, settings, q, 10), search_index(loaded, settings, q, 10)
    assert np.array_equal(before[1], after[1]) and np.allclose(before[0], after[0])
    # The bits' rescoring reads the same binary index without the int8 files.
    bits = read_index(path, ServingSettings(precision="ubinary"))
    assert bits.ntotal == len(catalog) and not hasattr(bits, "codes")


@pytest.mark.unit
def test_ubinary_rescoring_in_query_chunks_gives_the_same_results(monkeypatch):
    from clicktower.launcher.retrieval import serving

    catalog, q, _ = planted()
    for rescore in serving.RESCORE_SOURCES:
        settings = ServingSettings(precision="ubinary", rescore_multiplier=40, rescore=rescore)
        index = build_index(catalog, settings)
        monkeypatch.setattr(serving, "RESCORE_CHUNK", 1 << 24)
        whole = search_index(index, settings, q, 10)
        # A chunk of 3 queries' decoded candidates (400 x 64 values each): 14 chunks, the last short.
        monkeypatch.setattr(serving, "RESCORE_CHUNK", 3 * 400 * DIM)
        chunked = search_index(index, settings, q, 10)
        assert np.array_equal(whole[1], chunked[1]) and np.allclose(whole[0], chunked[0])


@pytest.mark.unit
@pytest.mark.parametrize("settings, floor", [
    (ServingSettings(index="ivf-pq:16,8", nprobe=16, train_sample=3000), 0.85),
    (ServingSettings(index="hnsw:16"), 0.95),
    (ServingSettings(index="hnsw:16", precision="int8"), 0.9),
    (ServingSettings(index="hnsw:16", precision="ubinary", rescore_multiplier=8), 0.7),
    (ServingSettings(index="ivf:16", precision="float16", nprobe=16), 0.99),
    (ServingSettings(dim=32, index="hnsw:16"), 0.7)])
def test_approximate_and_quantised_indexes_find_the_exact_neighbours(settings, floor):
    catalog, q, exact = planted()
    _, rows = search_index(build_index(catalog, settings), settings, q, 10)
    if settings.dim:  # against exact search at the same size
        small = prepare(catalog, settings.dim)
        exact = np.argsort(-(prepare(q, settings.dim) @ small.T), axis=1)[:, :10]
    assert overlap_at_k(rows, exact) >= floor


@pytest.mark.e2e
@pytest.mark.slow
def test_embed_records_settings_and_eval_and_search_apply_them(tmp_path, synth_dir):
    catalog = tmp_path / "catalog.jsonl"
    lines = (synth_dir / "catalog.jsonl").read_text().splitlines()[:60]
    catalog.write_text("\n".join(lines) + "\n")
    ids = [json.loads(line)["item_id"] for line in lines]
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"query": t, "relevance": {i: 3}}) + "\n" for t, i in
                               (("cordless drill", ids[1]), ("paint", ids[5]), ("lamp", ids[9]))))
    out = tmp_path / "index"
    result = clicktower("embed", "--model", MINILM, "--catalog", str(catalog), "--out", str(out),
                        "--dim", "128", "--precision", "int8", "--index", "hnsw:8")
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "index.json").read_text())
    assert meta["serving"]["dim"] == 128 and meta["serving"]["precision"] == "int8" and meta["embedding_dim"] == 384
    assert 128 <= meta["bytes_per_item"] < 4 * 128  # int8 codes plus the graph, not float32

    result = clicktower("eval", "--index", str(out), "--queries", str(queries))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["num_queries"] == 3 and summary["index/settings"]["precision"] == "int8"
    assert 0 <= summary["index/recall@10_vs_exact"] <= 1 and summary["index/bytes_per_item"] == meta["bytes_per_item"]
    assert 0 < summary["index/latency_p50_ms"] <= summary["index/latency_p99_ms"]

    # search applies the recorded settings (in process: the CLI's own class).
    served = SearchIndex(str(out))
    assert served.settings == ServingSettings(dim=128, precision="int8", index="hnsw:8")
    assert len(served.search(["cordless drill"], 5)[0]) == 5
    summary = evaluate(MINILM, str(queries), str(catalog), settings=ServingSettings(dim=64, precision="ubinary"))
    assert summary["index/settings"]["dim"] == 64 and summary["index/bytes_per_item"] == pytest.approx(8, abs=1)
    # search --dim/--precision: other settings, rebuilt in memory from the stored float32 shards.
    hits = clicktower("search", "--index", str(out), "--json", "-k", "3", "--dim", "64", "--precision", "ubinary",
                      "cordless drill")
    assert hits.returncode == 0, hits.stderr
    assert len(json.loads(hits.stdout.strip().splitlines()[-1])["hits"]) == 3
    bad = clicktower("eval", "--index", str(out), "--queries", str(queries), "--dim", "32")
    assert bad.returncode == 2 and "recorded settings" in bad.stderr

    # Binary in memory, int8 vectors beside it on disk: recorded, reported, read back.
    binary = tmp_path / "index_binary"
    result = clicktower("embed", "--model", MINILM, "--catalog", str(catalog), "--out", str(binary),
                        "--dim", "64", "--precision", "ubinary", "--rescore", "int8", "--rescore-multiplier", "10")
    assert result.returncode == 0, result.stderr
    meta = json.loads((binary / "index.json").read_text())
    assert meta["serving"]["rescore"] == "int8" and meta["bytes_per_item"] < 64 / 8 + 4
    assert meta["rescore_bytes_per_item"] == pytest.approx(64 + 2 * 4 * 64 / 60, abs=0.01)
    result = clicktower("eval", "--index", str(binary), "--queries", str(queries))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["index/settings"]["rescore"] == "int8"
    assert summary["index/rescore_bytes_per_item"] == meta["rescore_bytes_per_item"]
    assert summary["index/bytes_per_item"] == meta["bytes_per_item"]
