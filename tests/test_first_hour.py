"""The first hour of a new user (issue 27): no silent no-ops (each refused or warned about in one
line), errors that name the thing and its fix (the URL, the config key, the real column), and
no library warning floods."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from clicktower.data.errors import DataError
from clicktower.data.loader import ClickPairLoader, DataConfig
from clicktower.data.shards import write_shards
from clicktower.data.sources import FieldMap
from clicktower.data.storage import Storage
from clicktower.launcher.cli import main as clicktower_main
from clicktower.launcher.engine.config import ConfigError, load_config
from clicktower.launcher.engine.noop_checks import check_distillation, check_warmup

from conftest import TINY_CONFIG


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("clicktower: error: ")
    return lines[0]


@pytest.mark.unit
def test_distillation_without_teacher_scores_or_negatives_is_refused(shard_dir, tmp_path):
    cfg = load_config(TINY_CONFIG, [f"data.train_manifest={shard_dir}", "loss.distill_weight=0.5",
                                    "data.hard_negatives_per_query=2", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^loss.distill_weight=0.5: data.train_manifest \(.*\) has no teacher "
                                          r"scores.*--teacher-field.*loss.distill_weight=0$"):
        check_distillation(cfg, [["query", "item_id", "item_text"]])
    check_distillation(cfg, [["query", "hard_negatives", "teacher_scores"]])  # scores: fine
    cfg.data.hard_negatives_per_query = 0
    with pytest.raises(ConfigError, match="data.hard_negatives_per_query=0 reads none"):
        check_distillation(cfg, [["query", "hard_negatives", "teacher_scores"]])
    cfg.loss.distill_weight = 0.0
    check_distillation(cfg, [["query"]])   # off: nothing to say

    # Through training: refused before anything is written.
    from clicktower.launcher.engine.training import train

    cfg = load_config(TINY_CONFIG, [f"data.train_manifest={shard_dir}", "loss.distill_weight=0.5",
                                    f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="has no teacher scores"):
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.unit
def test_a_warmup_as_long_as_the_run_is_warned_about(caplog):
    cfg = load_config(TINY_CONFIG, ["optim.warmup_steps=50", "optim.lr=0.001"])
    with caplog.at_level(logging.WARNING, logger="clicktower"):
        check_warmup(cfg, 40, main_process=True)
        check_warmup(cfg, 40, main_process=False)   # one line per job, not per rank
    assert [r.getMessage() for r in caplog.records] == [
        "optim.warmup_steps=50 is not shorter than the run (40 steps): the learning rate never reaches "
        "optim.lr=0.001 (the last step uses 78% of it); lower optim.warmup_steps"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clicktower"):
        check_warmup(cfg, 51, main_process=True)
        check_warmup(load_config(TINY_CONFIG, ["optim.warmup_steps=0"]), 1, main_process=True)
    assert not caplog.records


@pytest.mark.unit
def test_appending_a_source_twice_is_refused_unless_forced(synth_dir, tmp_path, capsys):
    src = str(synth_dir / "train.jsonl")
    out = tmp_path / "set"
    write_shards([src], str(out), FieldMap(), shard_size=1000)
    assert clicktower_main(["shard", src, "--out", str(out), "--append"]) == 2
    line = _one_error_line(capsys)
    assert f"cannot append {src}: the shard set already holds it" in line and "--force" in line
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 2000
    # The same file by another path is the same source too.
    with pytest.raises(DataError, match="already holds it"):
        write_shards([str(synth_dir / ".." / synth_dir.name / "train.jsonl")], str(out), FieldMap(), append=True)
    assert clicktower_main(["shard", src, "--out", str(out), "--append", "--force"]) == 0
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 4000
    with pytest.raises(SystemExit) as usage:   # --force goes with --append (argparse's usage error)
        clicktower_main(["shard", src, "--out", str(tmp_path / "other"), "--force"])
    assert usage.value.code == 2 and "--force goes with --append" in capsys.readouterr().err


@pytest.mark.unit
def test_synth_argument_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    assert clicktower_main(["synth", "--out", str(tmp_path / "s"), "--pairs", "300", "--cold-items", "400"]) == 2
    line = _one_error_line(capsys)
    assert "--cold-items must be in [0, 240)" in line and "--items" in line
    assert clicktower_main(["synth", "--out", str(tmp_path / "s"), "--pairs", "0"]) == 2
    assert "--pairs must be >= 1" in _one_error_line(capsys)
    assert not (tmp_path / "s").exists()


@pytest.mark.unit
def test_a_missing_manifest_names_the_config_key(tmp_path, capsys):
    with pytest.raises(DataError, match=r"^data.train_manifest: .*nope.*: no such file"):
        ClickPairLoader.from_config(DataConfig(train_manifest=str(tmp_path / "nope")), 4)
    with pytest.raises(DataError, match=r"^data.mix\[0\].manifest: .*gone: no such file"):
        ClickPairLoader.from_config(DataConfig(mix=[{"manifest": str(tmp_path / "gone")}]), 4)


@pytest.mark.unit
def test_a_wrong_item_features_dim_names_the_key_and_the_width(synth_dir, tmp_path):
    rows = [json.loads(line) for line in (synth_dir / "train.jsonl").read_text("utf-8").splitlines()[:64]]
    for row in rows:
        row["features"] = [0.5] * 16
    (tmp_path / "f.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    write_shards([str(tmp_path / "f.jsonl")], str(tmp_path / "shards"), FieldMap(features="features"))
    loader = ClickPairLoader.from_config(DataConfig(train_manifest=str(tmp_path / "shards")), 8, features_dim=8)
    with pytest.raises(DataError) as err:
        next(iter(loader))
    message = str(err.value)
    assert "model.item_features_dim" in message and "vector of length 16, expected 8" in message
    assert "shuffle_buffer" not in message


@pytest.mark.unit
def test_syntax_errors_report_the_real_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"bert_config": {"hidden_size": 32}}, "train": {"max_steps" 5}}\n')
    assert clicktower_main(["config", "--config", str(bad)]) == 2
    line = _one_error_line(capsys)
    assert "invalid YAML at line 1, column 71: expected ',' or '}'" in line, line
    assert clicktower_main(["config", "model.bert_config={\"hidden_size\": 32, \"x\" 1}", "model.tokenizer=t"]) == 2
    assert "override model.bert_config=...: invalid YAML at line 1, column 25 of the value" in _one_error_line(capsys)
    # JSON Lines input: the column of the line, and of a JSON value inside a CSV cell.
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"query": "a", "item_id": "1", "item_text": "b"}\n'
                     '{"query": "saw", "item_id": "2", "item_text": "circular saw" "x": 1}\n')
    assert clicktower_main(["shard", str(jsonl), "--out", str(tmp_path / "s")]) == 2
    assert "line 2: invalid JSON: Expecting ',' delimiter at column 62" in _one_error_line(capsys)
    csv = tmp_path / "bad.csv"
    csv.write_text('query,item_id,item_text,negs\nq,1,t,"[{""item_id"": ""2"" ""item_text"": ""u""}]"\n')
    assert clicktower_main(["shard", str(csv), "--out", str(tmp_path / "s"), "--hard-negatives-field", "negs"]) == 2
    assert "Expecting ',' delimiter at column 18 of the value" in _one_error_line(capsys)


@pytest.mark.unit
def test_a_store_error_without_a_url_gets_it():
    """s3fs raises ``FileNotFoundError("The specified bucket does not exist")``: no URL in it."""
    def missing_bucket():
        raise FileNotFoundError("The specified bucket does not exist")

    with pytest.raises(FileNotFoundError) as err:
        Storage(max_retries=0)._retry("s3://no-such-bucket/x/shard-000000.tar", missing_bucket)
    assert err.value.filename == "s3://no-such-bucket/x/shard-000000.tar"
    assert err.value.strerror == "The specified bucket does not exist"
    # What the CLI prints of it: one line, the URL first.
    result = subprocess.run([sys.executable, "-c", "from clicktower.launcher.errors import run_cli\n"
                             "from clicktower.data.storage import Storage\n"
                             "def f():\n    raise FileNotFoundError('The specified bucket does not exist')\n"
                             "raise SystemExit(run_cli(lambda: Storage(max_retries=0)._retry('s3://b/x', f)))"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "clicktower: error: s3://b/x: The specified bucket does not exist"


_FLOODS = """
import logging, sys
if sys.argv[1] == "quiet":
    from clicktower.launcher.errors import _quiet_libraries
    _quiet_libraries()
import torch
from accelerate import PartialState
from accelerate.utils.other import clean_state_dict_for_safetensors
PartialState(cpu=True)
shared = torch.zeros(2)
clean_state_dict_for_safetensors({"a.weight": shared, "b.weight": shared, "c": torch.ones(1)})
import deepspeed  # noqa: F401  (its accelerator probe logs on import)
logging.getLogger("accelerate.utils.other").warning("Removed something else")
"""


@pytest.mark.unit
def test_library_warning_floods_are_filtered_narrowly():
    """accelerate's "Removed shared tensor" (every checkpoint save of shared towers) and
    DeepSpeed's "Setting accelerator to CPU" print without the filter and not with it; other
    records of the same loggers still do."""
    def run(mode: str) -> str:
        done = subprocess.run([sys.executable, "-c", _FLOODS, mode], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    loud, quiet = run("loud"), run("quiet")
    assert "Removed shared tensor" in loud and "Setting accelerator to CPU" in loud
    assert "Removed shared tensor" not in quiet and "Setting accelerator to CPU" not in quiet
    assert "Removed something else" in quiet
