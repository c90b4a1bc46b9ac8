"""WebDataset shard writing/reading and the manifest (clicktower.data.shards)."""
from __future__ import annotations

import gzip
import hashlib
import json
import os

import pytest

from clicktower.data.errors import DataError
from clicktower.data.shards import (FORMAT, MANIFEST_NAME, index_path, iter_shard,
                                    load_manifest, write_shards)
from clicktower.data.sources import FieldMap

pytestmark = pytest.mark.unit

# Unicode in queries and texts, numeric and string ids, a comma and a quote for CSV.
PAIRS = [
    {"query": "red running shoes", "item_id": 101, "item_text": "Nike Air Zoom – red", "label": 1},
    {"query": "größe 42 schuhe", "item_id": 102, "item_text": "Schuhe, Größe 42", "label": 2},
    {"query": "手机壳", "item_id": "sku-7", "item_text": "iPhone 手机壳 🎧", "label": 0},
    {"query": "café crème", "item_id": 104, "item_text": 'Mug "Café"', "label": 1},
    {"query": "usb c cable", "item_id": 0, "item_text": "USB-C cable 2m", "label": 3},
    {"query": "лампа", "item_id": 9007199254740993, "item_text": "Лампа настольная", "label": 0},
    {"query": "tent", "item_id": "sku-9", "item_text": "Zelt für 2 Personen", "label": 1},
]
EXPECTED = {(p["query"], str(p["item_id"]), p["item_text"], float(p["label"])) for p in PAIRS}
FM = FieldMap(label="label")


def write_csv(path, rows=PAIRS, delimiter=","):
    import csv

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def write_jsonl(path, rows=PAIRS):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def write_parquet(path, rows=PAIRS):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    # Parquet columns are typed: ids are all-int here so they stay int64 in the file.
    rows = [{**r, "item_id": i * 1000 + 1} for i, r in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    return str(path), {(r["query"], str(r["item_id"]), r["item_text"], float(r["label"]))
                       for r in rows}


def write_hf(path, rows=PAIRS):
    datasets = pytest.importorskip("datasets")
    rows = [{**r, "item_id": str(r["item_id"])} for r in rows]
    ds = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    return str(path)


def read_back(out_dir):
    manifest = load_manifest(out_dir)
    samples = [s for shard in manifest["shards"] for s in iter_shard(shard["path"])]
    return manifest, samples


def leftovers(tmp_path, name="out"):
    return sorted(p for p in os.listdir(tmp_path) if p.startswith(name))


def check_manifest_files(out_dir, manifest):
    for shard in manifest["shards"]:
        data = (out_dir / shard["path"]).read_bytes()
        assert len(data) == shard["bytes"]
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert len(list(iter_shard(str(out_dir / shard["path"])))) == shard["num_samples"]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "csv.gz", "jsonl", "jsonl.gz", "parquet", "hf"])
def test_round_trip_every_pair_once(tmp_path, fmt):
    expected = EXPECTED
    if fmt in ("csv", "csv.gz"):
        src = write_csv(tmp_path / f"clicks.{fmt}")
    elif fmt == "tsv":
        src = write_csv(tmp_path / "clicks.tsv", delimiter="\t")
    elif fmt.startswith("jsonl"):
        src = write_jsonl(tmp_path / f"clicks.{fmt}")
    elif fmt == "parquet":
        src, expected = write_parquet(tmp_path / "clicks.parquet")
    else:
        src = write_hf(tmp_path / "clicks_hf")
    out = tmp_path / "out"
    manifest = write_shards([src], str(out), FM, shard_size=3)

    assert manifest["format"] == FORMAT and manifest["version"] == 3
    assert manifest["num_samples"] == 7 and manifest["num_filtered"] == 0
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 3, 1]
    assert [s["path"] for s in manifest["shards"]] == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert manifest["fields"] == ["query", "item_id", "item_text", "label"]
    assert manifest["sources"] == [src] and manifest["field_map"]["label"] == "label"
    assert json.loads((out / MANIFEST_NAME).read_text("utf-8")) == manifest
    assert sorted(os.listdir(out)) == sorted([MANIFEST_NAME] + [s["path"] for s in manifest["shards"]]
                                             + [index_path(s["path"]) for s in manifest["shards"]])
    check_manifest_files(out, manifest)

    loaded, samples = read_back(str(out))
    got = [(s["query"], s["item_id"], s["item_text"], s["label"]) for s in samples]
    assert len(got) == len(expected) and set(got) == expected  # each pair exactly once
    assert all(isinstance(s["item_id"], str) for s in samples)
    assert len({s["__key__"] for s in samples}) == 7
    assert leftovers(tmp_path) == ["out"]  # no temporary directory left


def test_multiple_inputs_keys_stable_and_shards_reproducible(tmp_path):
    a = write_csv(tmp_path / "a.csv", PAIRS[:4])
    b = write_jsonl(tmp_path / "b.jsonl", PAIRS[4:])
    m1 = write_shards([a, b], str(tmp_path / "out1"), FM, shard_size=2)
    m2 = write_shards([a, b], str(tmp_path / "out2"), FM, shard_size=2)
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    _, samples = read_back(tmp_path / "out1")
    # Key = input index + row (JSONL: line), in file order, independent of shard size.
    assert [s["__key__"] for s in samples] == [
        "00000-000000000001", "00000-000000000002", "00000-000000000003",
        "00000-000000000004", "00001-000000000001", "00001-000000000002",
        "00001-000000000003"]
    m3 = write_shards([a, b], str(tmp_path / "out3"), FM, shard_size=100)
    assert len(m3["shards"]) == 1
    assert [s["__key__"] for s in read_back(tmp_path / "out3")[1]] == [
        s["__key__"] for s in samples]


def test_min_label_filter(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl")
    fm = FieldMap(label="label", min_label=1)
    manifest = write_shards([src], str(tmp_path / "out"), fm, shard_size=2)
    kept = {e for e in EXPECTED if e[3] >= 1}
    assert manifest["num_samples"] == len(kept) == 5 and manifest["num_filtered"] == 2
    _, samples = read_back(tmp_path / "out")
    assert {(s["query"], s["item_id"], s["item_text"], s["label"]) for s in samples} == kept

    with pytest.raises(DataError) as excinfo:
        write_shards([src], str(tmp_path / "none"), FieldMap(label="label", min_label=5))
    message = str(excinfo.value)
    assert "\n" not in message and src in message and "no samples" in message
    assert leftovers(tmp_path, "none") == []


def test_hard_negatives_and_weight_survive(tmp_path):
    rows = [{"q": "a", "id": 1, "text": "t", "w": 0.5,
             "negs": [{"item_id": 2, "item_text": "n2"}]}]
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    fm = FieldMap(query="q", item_id="id", item_text="text", weight="w", hard_negatives="negs")
    manifest = write_shards([src], str(tmp_path / "out"), fm)
    assert manifest["fields"] == ["query", "item_id", "item_text", "weight", "hard_negatives"]
    _, (sample,) = read_back(tmp_path / "out")
    assert sample == {"query": "a", "item_id": "1", "item_text": "t", "weight": 0.5,
                      "hard_negatives": [{"item_id": "2", "item_text": "n2"}],
                      "__key__": "00000-000000000001"}


BAD_ROW = {"query": "  ", "item_id": 5, "item_text": "x", "label": 1}


@pytest.mark.parametrize("case", [
    "missing_file", "empty_file", "missing_column", "non_numeric_label", "invalid_json",
    "empty_query", "empty_query_late", "second_input_missing_column",
])
def test_bad_inputs_leave_nothing_behind(tmp_path, case):
    good = write_csv(tmp_path / "good.csv")
    if case == "missing_file":
        inputs, parts = [str(tmp_path / "nope.csv")], ["no such file"]
    elif case == "empty_file":
        (tmp_path / "empty.jsonl").write_bytes(b"")
        inputs, parts = [str(tmp_path / "empty.jsonl")], ["empty file"]
    elif case == "missing_column":
        rows = [{k: v for k, v in p.items() if k != "label"} for p in PAIRS]
        inputs, parts = [write_csv(tmp_path / "c.csv", rows)], ["field 'label'", "missing"]
    elif case == "non_numeric_label":
        rows = [dict(p) for p in PAIRS]
        rows[2]["label"] = "clicked"
        inputs, parts = [write_csv(tmp_path / "c.csv", rows)], [
            "row 3", "field 'label'", "'clicked'"]
    elif case == "invalid_json":
        path = tmp_path / "c.jsonl"
        write_jsonl(path)
        path.write_text(path.read_text("utf-8") + '{"query": "broken"\n', "utf-8")
        inputs, parts = [str(path)], ["line 8", "invalid JSON"]
    elif case == "empty_query":
        inputs, parts = [write_jsonl(tmp_path / "c.jsonl", [BAD_ROW] + PAIRS)], [
            "line 1", "field 'query'", "empty text"]
    elif case == "empty_query_late":
        # Fails after two full shards were written: the temporary directory must go too.
        inputs, parts = [write_csv(tmp_path / "c.csv", PAIRS + [BAD_ROW])], [
            "row 8", "field 'query'", "empty text"]
    else:
        rows = [{k: v for k, v in p.items() if k != "item_text"} for p in PAIRS]
        inputs, parts = [good, write_jsonl(tmp_path / "c.jsonl", rows)], [
            "field 'item_text'", "missing"]
    with pytest.raises(DataError) as excinfo:
        write_shards(inputs, str(tmp_path / "out"), FM, shard_size=3)
    message = str(excinfo.value)
    assert "\n" not in message
    assert inputs[-1] in message, message
    for part in parts:
        assert part in message, (part, message)
    assert leftovers(tmp_path) == []  # neither out nor out.tmp-<pid>


def test_existing_output_dir(tmp_path):
    src = write_csv(tmp_path / "c.csv")
    out = tmp_path / "out"
    out.mkdir()
    write_shards([src], str(out), FM)  # an empty directory is fine
    first = (out / MANIFEST_NAME).read_text("utf-8")

    with pytest.raises(DataError) as excinfo:
        write_shards([src], str(out), FM, shard_size=2)
    message = str(excinfo.value)
    assert "\n" not in message and str(out) in message and "--overwrite" in message
    assert (out / MANIFEST_NAME).read_text("utf-8") == first  # untouched

    manifest = write_shards([src], str(out), FM, shard_size=2, overwrite=True)
    assert len(manifest["shards"]) == 4 and load_manifest(out)["num_samples"] == 7
    assert leftovers(tmp_path) == ["out"]

    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError) as excinfo:
        write_shards([src], str(other), FM, overwrite=True)
    assert "not a clicktower shard directory" in str(excinfo.value)
    assert (other / "notes.txt").read_text() == "keep me"


def test_bad_arguments(tmp_path):
    src = write_csv(tmp_path / "c.csv")
    for kwargs in ({"shard_size": 0}, {"shard_size": 2.5}):
        with pytest.raises(DataError, match="shard size"):
            write_shards([src], str(tmp_path / "out"), FM, **kwargs)
    with pytest.raises(DataError, match="non-empty list"):
        write_shards(src, str(tmp_path / "out"), FM)
    assert leftovers(tmp_path) == []


@pytest.fixture
def shard_dir(tmp_path):
    src = write_csv(tmp_path / "c.csv")
    out = tmp_path / "out"
    write_shards([src], str(out), FM, shard_size=3)
    return out


def test_load_manifest_file_or_dir(shard_dir):
    by_dir = load_manifest(str(shard_dir))
    by_file = load_manifest(str(shard_dir / MANIFEST_NAME), verify_checksums=True)
    assert by_dir == by_file
    assert by_dir["root"] == str(shard_dir)
    assert by_dir["path"] == str(shard_dir / MANIFEST_NAME)
    assert [s["path"] for s in by_dir["shards"]] == [
        str(shard_dir / f"shard-00000{i}.tar") for i in range(3)]


def test_load_manifest_missing_shard(shard_dir):
    (shard_dir / "shard-000001.tar").unlink()
    with pytest.raises(DataError) as excinfo:
        load_manifest(shard_dir)
    message = str(excinfo.value)
    assert "\n" not in message and "'shard-000001.tar'" in message and "missing" in message
    assert str(shard_dir / MANIFEST_NAME) in message


def test_load_manifest_size_and_checksum_mismatch(shard_dir):
    path = shard_dir / "shard-000002.tar"
    data = path.read_bytes()
    os.chmod(path, 0o644)
    path.write_bytes(data[:-512])
    with pytest.raises(DataError) as excinfo:
        load_manifest(shard_dir)
    assert "'shard-000002.tar'" in str(excinfo.value) and "bytes" in str(excinfo.value)
    path.write_bytes(data[:-1] + b"\x01")  # same size, different content
    load_manifest(shard_dir)  # sizes only by default
    with pytest.raises(DataError, match="shard-000002.tar.*sha256"):
        load_manifest(shard_dir, verify_checksums=True)


@pytest.mark.parametrize("edit, words", [
    ({"format": "something.else"}, "not a clicktower shard manifest"),
    ({"version": 4}, "unsupported version 4"),
    ({"fields": ["query"]}, "field 'fields'"),
    ({"num_samples": 8}, "field 'num_samples'"),
    ({"shards": []}, "field 'shards'"),
])
def test_load_manifest_rejects_bad_manifests(shard_dir, edit, words):
    path = shard_dir / MANIFEST_NAME
    path.write_text(json.dumps({**json.loads(path.read_text("utf-8")), **edit}), "utf-8")
    with pytest.raises(DataError) as excinfo:
        load_manifest(shard_dir)
    assert words in str(excinfo.value) and str(path) in str(excinfo.value)


def test_load_manifest_missing(tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        load_manifest(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_manifest(tmp_path / "nope" / MANIFEST_NAME)


def test_iter_shard_rejects_non_tar(tmp_path):
    path = tmp_path / "x.tar"
    path.write_bytes(b"definitely not a tar archive" * 40)
    with pytest.raises(DataError) as excinfo:
        list(iter_shard(str(path)))
    assert str(path) in str(excinfo.value)


def test_append_grows_a_set_without_rewriting_it(tmp_path):
    a = write_csv(tmp_path / "a.csv", PAIRS[:4])
    b = write_jsonl(tmp_path / "b.jsonl", PAIRS[4:])
    out = tmp_path / "out"
    write_shards([a], str(out), FM, shard_size=2)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()
              if p.name != MANIFEST_NAME}
    grown = write_shards([b], str(out), FM, shard_size=2, append=True)
    assert grown["num_samples"] == 7 and grown["sources"] == [a, b] and grown["appends"] == 1
    assert [s["path"] for s in grown["shards"]] == [f"shard-00000{i}.tar" for i in range(4)]
    for name, (data, mtime) in before.items():   # the old shards are not touched
        assert (out / name).read_bytes() == data and (out / name).stat().st_mtime_ns == mtime
    assert load_manifest(out, verify_checksums=True) == {**grown, "shards": load_manifest(out)["shards"],
                                                         "path": str(out / MANIFEST_NAME),
                                                         "root": str(out), "on_missing": "raise"}
    _, samples = read_back(str(out))
    assert {(s["query"], s["item_id"], s["item_text"], s["label"]) for s in samples} == EXPECTED
    # the appended input is input number 1: its keys cannot collide with input 0's
    assert sorted(s["__key__"][:5] for s in samples) == ["00000"] * 4 + ["00001"] * 3
    assert leftovers(tmp_path) == ["out"]
    with pytest.raises(DataError, match="field mapping differs"):
        write_shards([b], str(out), FieldMap(), append=True)
    with pytest.raises(DataError, match="gzip"):
        write_shards([b], str(out), FM, append=True, gzip=True)
    with pytest.raises(DataError, match="no manifest.json"):
        write_shards([b], str(tmp_path), FM, append=True)
    assert len(load_manifest(out)["shards"]) == 4 and leftovers(tmp_path) == ["out"]
