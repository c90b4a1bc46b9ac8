"""Input readers and record -> sample mapping (clicktower.data.sources)."""
from __future__ import annotations

import gzip

import pytest

from clicktower.data.errors import DataError
from clicktower.data.sources import (FieldMap, check_fields, iter_records, record_fields,
                                     to_sample)

pytestmark = pytest.mark.unit


def write(path, text: str, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return str(path)


def one_line_error(excinfo, *parts):
    """The DataError message is one line and names every part given."""
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message
    for part in parts:
        assert part in message, (part, message)
    return message


CSV = "query,item_id,item_text,label\nred shoes,123,Rote Schuhe – größe 42,1\nhat,abc,\"Hat, blue\",0\n"


# ------------------------------------------------------------------ FieldMap


def test_field_map_defaults_and_fields():
    fm = FieldMap()
    assert (fm.query, fm.item_text, fm.item_id, fm.label) == ("query", "item_text", "item_id", None)
    assert fm.sample_fields() == ["query", "item_id", "item_text"]
    fm = FieldMap(label="clicks", min_label=1, weight="w", hard_negatives="negs")
    assert fm.min_label == 1.0 and isinstance(fm.min_label, float)
    assert fm.sample_fields() == ["query", "item_id", "item_text", "label", "weight",
                                  "hard_negatives"]
    assert fm.source_fields() == ["query", "item_id", "item_text", "clicks", "w", "negs"]
    assert FieldMap(**fm.to_dict()) == fm


@pytest.mark.parametrize("kwargs, words", [
    ({"min_label": 1.0}, "min_label needs a label"),
    ({"query": ""}, "query must be a non-empty"),
    ({"item_id": "  "}, "item_id must be a non-empty"),
    ({"label": ""}, "label must be"),
    ({"label": "l", "min_label": "high"}, "min_label must be a finite number"),
    ({"label": "l", "min_label": float("nan")}, "min_label must be a finite number"),
])
def test_field_map_validation(kwargs, words):
    with pytest.raises(DataError) as excinfo:
        FieldMap(**kwargs)
    one_line_error(excinfo, words)


# ------------------------------------------------------------------ readers


def test_csv_records_rows_are_data_rows(tmp_path):
    # BOM, blank line and spaces around header names are tolerated; rows skip the header.
    path = write(tmp_path / "c.csv", "\ufeffquery , item_id,item_text\n\nq1,1,t1\n\nq2,2,t2\n")
    assert record_fields(path) == ["query", "item_id", "item_text"]
    assert list(iter_records(path)) == [
        (1, {"query": "q1", "item_id": "1", "item_text": "t1"}),
        (2, {"query": "q2", "item_id": "2", "item_text": "t2"}),
    ]


def test_csv_quoted_multiline_and_tsv(tmp_path):
    path = write(tmp_path / "c.csv", 'query,item_text\n"two\nlines","a ""quote"", comma"\n')
    assert list(iter_records(path)) == [(1, {"query": "two\nlines",
                                             "item_text": 'a "quote", comma'})]
    path = write(tmp_path / "t.TSV", "query\titem_text\nq, with comma\tt\n")
    assert list(iter_records(path)) == [(1, {"query": "q, with comma", "item_text": "t"})]


def test_jsonl_rows_are_line_numbers(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"query": "q1"}\n\n  \n{"query": "ü"}\n')
    assert list(iter_records(path)) == [(1, {"query": "q1"}), (4, {"query": "ü"})]
    assert record_fields(path) == ["query"]
    path = write(tmp_path / "c.json", '{"a": 1}\n')  # .json is read as JSON Lines
    assert list(iter_records(path)) == [(1, {"a": 1})]


def test_gzip_inputs(tmp_path):
    (tmp_path / "c.csv.gz").write_bytes(gzip.compress(CSV.encode()))
    rows = list(iter_records(str(tmp_path / "c.csv.gz")))
    assert len(rows) == 2 and rows[0][1]["item_text"] == "Rote Schuhe – größe 42"
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(b'{"q": 1}\n{"q": 2}\n'))
    assert list(iter_records(str(tmp_path / "c.jsonl.gz"))) == [(1, {"q": 1}), (2, {"q": 2})]
    (tmp_path / "bad.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError) as excinfo:
        list(iter_records(str(tmp_path / "bad.csv.gz")))
    one_line_error(excinfo, "bad.csv.gz", "gzip")


def test_parquet_streams_batches(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"query": [f"q{i}" for i in range(10)], "item_id": list(range(10))})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=3)
    rows = list(iter_records(str(tmp_path / "c.parquet")))
    assert [r for r, _ in rows] == list(range(1, 11))
    assert rows[9][1] == {"query": "q9", "item_id": 9}
    assert record_fields(str(tmp_path / "c.parquet")) == ["query", "item_id"]
    with pytest.raises(DataError) as excinfo:
        check_fields(str(tmp_path / "c.parquet"), FieldMap())
    one_line_error(excinfo, "c.parquet: field 'item_text': missing from the Parquet schema")


def test_hf_dataset_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"query": ["a", "b"], "item_id": [1, 2]})
    ds.save_to_disk(str(tmp_path / "single"))
    assert list(iter_records(str(tmp_path / "single"))) == [
        (1, {"query": "a", "item_id": 1}), (2, {"query": "b", "item_id": 2})]
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    assert list(iter_records(str(tmp_path / "dd") + ":test")) == [(1, {"query": "b",
                                                                       "item_id": 2})]
    with pytest.raises(DataError) as excinfo:
        list(iter_records(str(tmp_path / "dd")))
    one_line_error(excinfo, str(tmp_path / "dd"), "PATH:split", "'train'", "'test'")
    with pytest.raises(DataError) as excinfo:
        list(iter_records(str(tmp_path / "dd") + ":valid"))
    one_line_error(excinfo, "no split 'valid'")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError) as excinfo:
        list(iter_records(str(tmp_path / "plain")))
    one_line_error(excinfo, "plain", "save_to_disk")


@pytest.mark.parametrize("name, content, parts", [
    ("empty.csv", b"", ["empty file, no rows"]),
    ("empty.jsonl", b"", ["empty file, no rows"]),
    ("blank.jsonl", b"\n  \n", ["empty file, no rows"]),
    ("header.csv", b"query,item_id\n", ["no rows", "only a header"]),
    ("empty.parquet", b"", ["empty file, no rows"]),
    ("bad.jsonl", b'{"query": "a"}\n{"query": "b",}\n', ["line 2", "invalid JSON"]),
    ("array.json", b'[{"query": "a"},\n{"query": "b"}]\n', ["line 1", "not a JSON array"]),
    ("scalar.jsonl", b'{"query": "a"}\n7\n', ["line 2", "expected a JSON object"]),
    ("cols.csv", b"query,item_id\na,1\nb,2,extra\n", ["row 2", "expected 2 columns", "got 3"]),
    ("dupe.csv", b"query,query\na,b\n", ["repeats column", "'query'"]),
    ("utf.csv", b"query,item_id\na,1\n\xff\xfe,2\n", ["row 2", "invalid UTF-8", "line 3"]),
    ("utf.jsonl", b'{"query": "a"}\n{"query": "\xc3("}\n', ["line 2", "invalid UTF-8"]),
    ("notes.txt", b"hello\n", ["unsupported input type '.txt'"]),
    ("noext", b"hello\n", ["unsupported input type"]),
    ("junk.parquet", b"this is not parquet", ["not a readable Parquet file"]),
])
def test_unreadable_inputs(tmp_path, name, content, parts):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as excinfo:
        list(iter_records(str(path)))
    one_line_error(excinfo, str(path), *parts)


def test_missing_file_fails_eagerly(tmp_path):
    path = str(tmp_path / "nope.csv")
    with pytest.raises(DataError) as excinfo:
        iter_records(path)  # no iteration needed
    assert str(excinfo.value) == f"{path}: no such file"


def test_check_fields_names_missing_column(tmp_path):
    path = write(tmp_path / "c.csv", CSV)
    assert check_fields(path, FieldMap(label="label")) == ["query", "item_id", "item_text", "label"]
    with pytest.raises(DataError) as excinfo:
        check_fields(path, FieldMap(item_text="title"))
    one_line_error(excinfo, path, "field 'title'", "missing from the header", "'item_text'")
    jsonl = write(tmp_path / "c.jsonl", '\n{"q": "a", "item_id": 1, "item_text": "t"}\n')
    with pytest.raises(DataError) as excinfo:
        check_fields(jsonl, FieldMap())
    one_line_error(excinfo, f"{jsonl}: line 2: field 'query': missing from the first record",
                   "available fields: 'q'")


# ------------------------------------------------------------------ to_sample


def test_to_sample_normalises():
    rec = {"query": "  red shoes ", "item_id": 123, "item_text": "Schuh – 42 ",
           "label": " 2 ", "w": "0.5", "negs": '[{"item_id": 7, "item_text": " x "}]'}
    fm = FieldMap(label="label", weight="w", hard_negatives="negs")
    assert to_sample(rec, fm, source="a.csv", row=1) == {
        "query": "red shoes", "item_id": "123", "item_text": "Schuh – 42", "label": 2.0,
        "weight": 0.5, "hard_negatives": [{"item_id": "7", "item_text": "x"}]}
    rec.update(item_id=123.0, negs=[{"item_id": "a", "item_text": "b", "extra": 1}])
    sample = to_sample(rec, fm, source="a.parquet", row=1)
    assert sample["item_id"] == "123"
    assert sample["hard_negatives"] == [{"item_id": "a", "item_text": "b"}]
    rec.update(negs="")  # an empty CSV cell: no hard negatives
    assert to_sample(rec, fm, source="a.csv", row=1)["hard_negatives"] == []
    assert "label" not in to_sample(rec, FieldMap(), source="a.csv", row=1)


def test_min_label_keeps_equal_and_filters_below():
    fm = FieldMap(label="clicks", min_label=1)
    base = {"query": "q", "item_id": "i", "item_text": "t"}
    assert to_sample({**base, "clicks": "1"}, fm, source="a.csv", row=1)["label"] == 1.0
    assert to_sample({**base, "clicks": 3}, fm, source="a.csv", row=1)["label"] == 3.0
    assert to_sample({**base, "clicks": "0.99"}, fm, source="a.csv", row=1) is None
    # A filtered row is never validated further: its empty query is no error.
    assert to_sample({"query": "", "item_id": "", "item_text": "", "clicks": 0}, fm,
                     source="a.csv", row=1) is None


@pytest.mark.parametrize("record, fm, parts", [
    ({"q": "a", "item_id": 1, "item_text": "t"}, FieldMap(),
     ["row 4", "field 'query'", "missing", "available fields: 'q', 'item_id', 'item_text'"]),
    ({"query": "a", "item_id": 1, "item_text": "t", "label": "yes"}, FieldMap(label="label"),
     ["row 4", "field 'label'", "not a number: 'yes'"]),
    ({"query": "a", "item_id": 1, "item_text": "t", "label": ""}, FieldMap(label="label"),
     ["row 4", "field 'label'", "not a number: ''"]),
    ({"query": "a", "item_id": 1, "item_text": "t", "label": "nan"}, FieldMap(label="label"),
     ["field 'label'", "not a finite number"]),
    ({"query": "  ", "item_id": 1, "item_text": "t"}, FieldMap(), ["row 4", "field 'query'",
                                                                   "empty text"]),
    ({"query": "a", "item_id": 1, "item_text": None}, FieldMap(), ["field 'item_text'",
                                                                   "empty text"]),
    ({"query": "a", "item_id": "", "item_text": "t"}, FieldMap(), ["field 'item_id'",
                                                                   "empty item id"]),
    ({"query": "a", "item_id": 1.5, "item_text": "t"}, FieldMap(), ["field 'item_id'",
                                                                    "text or an integer"]),
    ({"query": ["a"], "item_id": 1, "item_text": "t"}, FieldMap(), ["expected text, got list"]),
    ({"query": "a", "item_id": 1, "item_text": "t", "w": -1}, FieldMap(weight="w"),
     ["field 'w'", "negative weight"]),
    ({"query": "a", "item_id": 1, "item_text": "t", "n": "[{oops"},
     FieldMap(hard_negatives="n"), ["field 'n'", "not a JSON list"]),
    ({"query": "a", "item_id": 1, "item_text": "t", "n": [{"item_id": 1}]},
     FieldMap(hard_negatives="n"), ["field 'n'", "entry 0"]),
    ({"query": "a", "item_id": 1, "item_text": "t", "n": [{"item_id": 1, "item_text": ""}]},
     FieldMap(hard_negatives="n"), ["field 'n[0].item_text'", "empty text"]),
])
def test_to_sample_errors(record, fm, parts):
    with pytest.raises(DataError) as excinfo:
        to_sample(record, fm, source="clicks.csv", row=4)
    one_line_error(excinfo, "clicks.csv: ", *parts)


def test_jsonl_errors_say_line_and_values_stay_on_one_line():
    with pytest.raises(DataError) as excinfo:
        to_sample({"query": "a", "item_id": 1, "item_text": "t", "label": "1\n2"},
                  FieldMap(label="label"), source="c.jsonl.gz", row=9)
    message = one_line_error(excinfo, "c.jsonl.gz: line 9: field 'label'")
    assert excinfo.value.row == 9 and excinfo.value.field == "label"
    assert "'1\\n2'" in message
