"""Weighted mixing and the infinite stream, exposed through the data config and trained on
through the real ``clicktower train`` path."""
from __future__ import annotations

import json

import pytest

from clicktower.data.loader import ClickPairLoader, Rank
from clicktower.data.shards import write_shards
from clicktower.data.sources import FieldMap
from clicktower.launcher.engine.config import ConfigError, load_config
from conftest import TINY_CONFIG, clicktower

# Manifest B's input starts with this many blank lines, so its keys (line numbers) tell its
# samples from A's, whose lines are 1..1000.
B_OFFSET = 5000


@pytest.fixture(scope="module")
def two_manifests(synth_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    lines = (synth_dir / "train.jsonl").read_text("utf-8").splitlines(keepends=True)
    (root / "a.jsonl").write_text("".join(lines[:1000]), "utf-8")
    (root / "b.jsonl").write_text("\n" * B_OFFSET + "".join(lines[1000:1300]), "utf-8")
    for name in ("a", "b"):
        write_shards([str(root / f"{name}.jsonl")], str(root / name), FieldMap(), shard_size=200)
    return root / "a", root / "b"


def _mix(a, b, wa=0.75, wb=0.25):
    return f"data.mix=[{{manifest: '{a}', weight: {wa}}}, {{manifest: '{b}', weight: {wb}}}]"


@pytest.mark.unit
def test_mix_config_is_validated(tmp_path):
    cfg = load_config(TINY_CONFIG, [_mix("x", "y")])
    assert [(m.manifest, m.weight) for m in cfg.data.mix] == [("x", 0.75), ("y", 0.25)]
    assert cfg.data.manifests() == ["x", "y"]
    for override, message in [
        ([_mix("x", "y"), "data.train_manifest=z"], "not both"),
        ([_mix("x", "y", -1, 1)], "weight of x must be a finite number >= 0"),
        ([_mix("x", "y", 0, 0)], "must not all be 0"),
        (["data.mix=[]"], "at least one"),
        (["data.mix=[{manifest: x, wieght: 1}]"], "unknown key data.mix[0].wieght"),
        (["data.mix=[{weight: 1}]"], "manifest"),
        (["data.infinite=maybe"], "data.infinite: expected true or false"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as exc:
            load_config(TINY_CONFIG, override)
        assert "\n" not in str(exc.value)


@pytest.mark.e2e
def test_train_on_a_weighted_mix(two_manifests, tmp_path):
    a, b = two_manifests
    steps, run_dir = 6, tmp_path / "run"
    overrides = [_mix(a, b), f"train.output_dir={run_dir}", f"train.max_steps={steps}",
                 "train.sample_keys_log=true", "train.progress_bar=false", "train.log_every_steps=3"]
    result = clicktower("train", "--config", str(TINY_CONFIG), *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = [json.loads(line)["keys"] for line in
               (run_dir / "sample_keys" / "rank_0.jsonl").read_text().splitlines()]
    assert len(trained) == steps
    # Exactly the loader's mixed stream for this config: same seed, order and weights.
    cfg = load_config(TINY_CONFIG, overrides)
    loader = ClickPairLoader(cfg.data, [str(a), str(b)], cfg.train.batch_size, Rank(0, 1),
                             cfg.train.seed)
    assert loader.infinite
    expected = [batch.keys for _, batch in zip(range(steps), loader)]
    assert trained == expected
    from_b = sum(int(k.split("-")[1]) > B_OFFSET for keys in trained for k in keys)
    assert 0 < from_b < steps * cfg.train.batch_size / 2   # ~25% of 96 pairs come from b
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6] and all(r["loss"] > 0 for r in records)
