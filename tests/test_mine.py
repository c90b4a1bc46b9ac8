"""clicktower mine: the filtering rules on hand-built embeddings, and the CLI end to end."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from clicktower.data.loader import ClickPairLoader, DataConfig, PairTokenizer
from clicktower.data.shards import iter_shard, load_manifest
from clicktower.launcher.retrieval.mining import mine_negatives
from clicktower.modeling.towers import TwoTower, TwoTowerConfig, resolve_model_path

from conftest import MINILM, clicktower
from dist_launch import accelerate_launch


def _unit_with_score(score: float, axis: int, dim: int = 8) -> torch.Tensor:
    """A unit vector whose inner product with e0 is ``score`` (rest on another axis)."""
    v = torch.zeros(dim)
    v[0], v[axis] = score, (1.0 - score ** 2) ** 0.5
    return v


@pytest.mark.unit
def test_mining_skips_positive_same_id_same_text_clicked_and_too_close():
    query = torch.zeros(1, 8)
    query[0, 0] = 1.0
    # id, text, score against the query.
    pool = [("A", "cordless drill", 0.90),          # the sample's own positive
            ("A2", "Cordless  DRILL", 0.97),       # the same product listed twice (same text)
            ("B", "drill bit set", 0.86),          # clicked for the same query: not a negative
            ("C", "impact driver", 0.88),          # above positive - margin: likely a positive
            ("D", "hammer", 0.80),
            ("E", "saw", 0.70),
            ("F", "paint", 0.60),
            ("G", "rug", 0.50)]
    emb = torch.stack([_unit_with_score(s, 1 + i % 7) for i, (_, _, s) in enumerate(pool)])
    ids, texts = [p[0] for p in pool], [p[1] for p in pool]
    samples = [{"item_id": "A", "item_text": "cordless drill"}]
    got = mine_negatives(query, emb, ids, texts, samples, [0], [0], [{"A", "B"}], ranks=(1, 100),
                         margin=0.05, negatives=3)
    assert [n["item_id"] for n in got[0]] == ["D", "E", "F"]
    # The rank window counts every candidate, filtered or not: ranks 7-8 are F and G.
    got = mine_negatives(query, emb, ids, texts, samples, [0], [0], [{"A", "B"}], ranks=(7, 8),
                         margin=0.05, negatives=5)
    assert [n["item_id"] for n in got[0]] == ["F", "G"]


@pytest.mark.unit
def test_mining_rules_hold_on_random_embeddings():
    gen = torch.Generator().manual_seed(0)
    pool = F.normalize(torch.randn(300, 16, generator=gen), dim=-1)
    queries = F.normalize(pool[:40] + 0.3 * torch.randn(40, 16, generator=gen), dim=-1)
    ids = [f"p{i % 250}" if i < 250 else f"x{i}" for i in range(300)]   # unique ids
    texts = [f"item {i}" for i in range(300)]
    query_row = [i % 40 for i in range(120)]
    # Two thirds of the samples click the item their query was drawn near, the rest a far one.
    positive_row = [i % 40 if i < 80 else (7 * i) % 300 for i in range(120)]
    samples = [{"item_id": ids[r], "item_text": texts[r]} for r in positive_row]
    clicked = [set() for _ in range(40)]
    for q, r in zip(query_row, positive_row):
        clicked[q].add(ids[r])
    mined = mine_negatives(queries, pool, ids, texts, samples, query_row, positive_row, clicked,
                           ranks=(3, 60), margin=0.02, negatives=6)
    order = (queries @ pool.T).argsort(dim=1, descending=True)
    assert sum(map(len, mined)) > 300
    for q, r, negs in zip(query_row, positive_row, mined):
        window = {ids[i] for i in order[q, 2:60].tolist()}
        positive_score = float(queries[q] @ pool[r])
        assert len(negs) <= 6
        for n in negs:
            assert n["item_id"] != ids[r] and n["item_id"] not in clicked[q]
            assert n["item_id"] in window and n["score"] <= positive_score - 0.02 + 1e-6


def _line_pool():
    """One query (e0) and a pool scored 0.90 (the positive) down to 0.40 in steps of 0.05."""
    query = torch.zeros(1, 8)
    query[0, 0] = 1.0
    pool = [("P", "drill red 18v", 0.90), ("V1", "Drill blue 18V", 0.85), ("V2", "drill 12v red", 0.80),
            ("J", "judged saw", 0.75), ("D", "hammer", 0.70), ("E", "saw", 0.65), ("F", "paint", 0.60),
            ("G", "rug", 0.55), ("H", "tape", 0.50), ("I", "glue", 0.45), ("K", "nail", 0.40)]
    emb = torch.stack([_unit_with_score(s, 1 + i % 7) for i, (_, _, s) in enumerate(pool)])
    return query, emb, [p[0] for p in pool], [p[1] for p in pool]


def _mine_line(**rules):
    query, emb, ids, texts = _line_pool()
    samples = [{"item_id": "P", "item_text": "drill red 18v"}]
    rules = {"ranks": (1, 100), "margin": None, "negatives": 3, **rules}
    return [n["item_id"] for n in mine_negatives(query, emb, ids, texts, samples, [0], [0], [{"P"}], **rules)[0]]


@pytest.mark.unit
def test_relative_margin_drops_candidates_above_a_share_of_the_positive_score():
    # (1 - 0.2) x 0.90 = 0.72: V1, V2 and J (0.85, 0.80, 0.75) go, D (0.70) is the first kept.
    assert _mine_line(relative_margin=0.2) == ["D", "E", "F"]
    assert _mine_line() == ["V1", "V2", "J"]
    # Both margins: the stricter bound wins (0.90 - 0.05 = 0.85 keeps V2; 0.72 does not).
    assert _mine_line(margin=0.05, relative_margin=0.2) == ["D", "E", "F"]
    assert _mine_line(margin=0.27, relative_margin=0.05) == ["F", "G", "H"]  # 0.63 < 0.855


@pytest.mark.unit
def test_exclusion_lists_and_variant_keys_remove_candidates():
    query, emb, ids, texts = _line_pool()
    samples = [{"item_id": "P", "item_text": "drill red 18v"}]
    got = mine_negatives(query, emb, ids, texts, samples, [0], [0], [{"P"}], ranks=(1, 100), margin=None,
                         negatives=3, exclude=[{"J", "E"}])
    assert [n["item_id"] for n in got[0]] == ["V1", "V2", "D"]
    # Colour and voltage words removed: "drill 18v"... V1 ("drill blue 18v") and P agree once
    # colours go; V2 also once voltages go.
    assert _mine_line(variant_key=r"\b(red|blue)\b") == ["V2", "J", "D"]
    assert _mine_line(variant_key=r"\b(red|blue|\d+v)\b") == ["J", "D", "E"]
    # A variant of ANOTHER item clicked for the query is excluded too.
    two = [{"item_id": "P", "item_text": "drill red 18v"}, {"item_id": "E", "item_text": "saw"}]
    query, emb, ids, texts = _line_pool()
    got = mine_negatives(query, emb, ids, texts, two, [0, 0], [0, 5], [{"P", "E"}], ranks=(1, 100), margin=None,
                         negatives=3, variant_key=r"^judged ")
    assert [n["item_id"] for n in got[0]] == ["V1", "V2", "D"]  # "judged saw" is a variant of "saw"


@pytest.mark.unit
def test_random_sampling_is_seeded_inside_the_window_and_listed_best_first():
    window = ["V1", "V2", "J", "D", "E", "F", "G", "H", "I", "K"]
    draws = {seed: _mine_line(sample="random", seed=seed, negatives=4) for seed in range(6)}
    for got in draws.values():
        assert len(got) == 4 and set(got) <= set(window)
        assert got == sorted(got, key=window.index)  # rank order
    assert draws[0] == _mine_line(sample="random", seed=0, negatives=4)  # the same seed, the same choice
    assert len({tuple(g) for g in draws.values()}) > 1  # not the top four every time
    # Ranks 2-4 (rank 1 is the positive): fewer survivors than asked, all of them.
    assert _mine_line(sample="random", ranks=(2, 4), negatives=5) == ["V1", "V2", "J"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random tiny two-tower model saved as a final/ folder (seconds to embed 2,000 queries)."""
    from transformers import AutoTokenizer

    cfg = TwoTowerConfig(bert_config={"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 1,
                                      "num_attention_heads": 2, "intermediate_size": 64,
                                      "max_position_embeddings": 64}, tokenizer=MINILM)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "final"
    TwoTower.from_config(cfg).save_pretrained(folder, AutoTokenizer.from_pretrained(cfg.tokenizer_path), 16, 32)
    return folder


# A random model scores positives like anything else: no margin filter here (the margin rule
# is checked above), so that most samples get negatives.
MINE_ARGS = ("--ranks", "2", "40", "--negatives", "3", "--margin", "-2")


@pytest.fixture(scope="module")
def mined_one(tiny_model, shard_dir, synth_dir, tmp_path_factory):
    """``clicktower mine`` in one process: (output folder, its summary line)."""
    out = tmp_path_factory.mktemp("mine1") / "mined"
    result = clicktower("mine", "--model", str(tiny_model), "--manifest", str(shard_dir), "--out", str(out),
                        "--catalog", str(synth_dir / "catalog.jsonl"), *MINE_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads(result.stdout.strip().splitlines()[-1])


def _negatives(folder):
    manifest = load_manifest(str(folder))
    return [(s["__key__"], [n["item_id"] for n in s["hard_negatives"]])
            for shard in manifest["shards"] for s in iter_shard(shard["path"])]


@pytest.mark.e2e
def test_mine_cli_writes_shards_that_train_with_hard_negatives(mined_one, tiny_model, shard_dir):
    out, summary = mined_one
    source, mined = load_manifest(str(shard_dir)), load_manifest(str(out))
    assert mined["num_samples"] == source["num_samples"] == summary["num_samples"]
    assert "hard_negatives" in mined["fields"] and summary["samples_with_negatives"] > 0.9 * summary["num_samples"]
    samples = [s for shard in mined["shards"] for s in iter_shard(shard["path"])]
    clicked: dict[str, set[str]] = {}
    for s in samples:
        clicked.setdefault(s["query"], set()).add(s["item_id"])
    for s in samples:
        assert len(s["hard_negatives"]) <= 3
        for n in s["hard_negatives"]:
            assert n["item_id"] != s["item_id"] and n["item_id"] not in clicked[s["query"]]
    assert (out / "mining.json").is_file()
    assert not list(out.parent.glob("mined.mine-*")), "temporary folder left behind"

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    tokens = PairTokenizer(tok, max_query_length=32, max_item_length=32)
    batch = next(iter(ClickPairLoader(DataConfig(hard_negatives_per_query=2), str(out), 16, tokens=tokens)))
    assert batch.tokens["item_input_ids"].shape[0] == 16 + len(batch.labels.hard_negative_ids)
    assert len(batch.labels.hard_negative_ids) > 0
    # No hard negative of the batch is the positive of the sample it came with.
    for s, negs in zip(batch.items, batch.hard_negatives):
        assert all(n["item_text"] != s for n in negs)

    again = clicktower("mine", "--model", str(tiny_model), "--manifest", str(shard_dir), "--out", str(out))
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert "--overwrite" in again.stderr


@pytest.mark.e2e
def test_mine_on_two_ranks_equals_one_rank(mined_one, tiny_model, shard_dir, synth_dir, tmp_path):
    out = tmp_path / "mined2"
    # Two gloo processes on the CPU (configs/accelerate/cpu_2proc_ddp.yaml, a free port).
    result = accelerate_launch("cpu_2proc_ddp", ["-m", "clicktower.launcher.mine",
                                             "--model", str(tiny_model), "--manifest", str(shard_dir), "--out", str(out),
                                             "--catalog", str(synth_dir / "catalog.jsonl"), *MINE_ARGS])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["num_processes"] == 2
    assert _negatives(out) == _negatives(mined_one[0])


@pytest.mark.e2e
def test_mine_cli_positive_aware_flags(tiny_model, shard_dir, synth_dir, tmp_path):
    """--relative-margin, --sample random --seed, --variant-key through the CLI: the summary
    records them and the mining time, and the same seed mines the same negatives."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = clicktower("mine", "--model", str(tiny_model), "--manifest", str(shard_dir), "--out", str(out),
                            "--ranks", "2", "40", "--negatives", "3", "--margin", "-2", "--relative-margin", "0",
                            "--sample", "random", "--seed", "7", "--variant-key", r"\d+")
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append((out, json.loads(result.stdout.strip().splitlines()[-1])))
    summary = runs[0][1]
    assert summary["relative_margin"] == 0 and summary["sample"] == "random" and summary["seed"] == 7
    assert summary["variant_key"] == r"\d+" and summary["mining_seconds"] > 0
    assert _negatives(runs[0][0]) == _negatives(runs[1][0])
    # A random model: only candidates below the positive survive --relative-margin 0, so the
    # samples whose positive ranks beyond the window get none.
    assert summary["samples_with_negatives"] > 0
    bad = clicktower("mine", "--model", str(tiny_model), "--manifest", str(shard_dir), "--out",
                     str(tmp_path / "c"), "--variant-key", "(")
    assert bad.returncode == 2 and "--variant-key" in bad.stderr


def _own_negatives_input(synth_dir, folder) -> str:
    """40 synthetic pairs as shards: the even ones with 2 hard negatives and 3 teacher scores,
    the odd ones with none and 1 teacher score (the positive's)."""
    from clicktower.data.shards import write_shards
    from clicktower.data.sources import FieldMap

    rows = [json.loads(line) for line in (synth_dir / "train.jsonl").read_text("utf-8").splitlines()[:40]]
    catalog = [json.loads(line) for line in (synth_dir / "catalog.jsonl").read_text("utf-8").splitlines()]
    for i, row in enumerate(rows):
        negs = [c for c in catalog if c["item_id"] != row["item_id"]][i: i + 2] if i % 2 == 0 else []
        row["hard_negatives"] = [{"item_id": c["item_id"], "item_text": c["item_text"]} for c in negs]
        row["teacher_scores"] = [9.0] + [1.0 + j for j in range(len(negs))]
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    write_shards([str(folder / "train.jsonl")], str(folder / "shards"),
                 FieldMap(hard_negatives="hard_negatives", teacher_scores="teacher_scores"), shard_size=100)
    return str(folder / "shards")


@pytest.mark.unit
def test_mine_refuses_existing_negatives_unless_told_keep_merge_or_replace(tiny_model, synth_dir, tmp_path, capsys,
                                                                            caplog):
    """Input with its own hard negatives and teacher scores: refused in one line without
    --existing (before the model loads); keep / merge / replace each do and say what they say."""
    from clicktower.launcher.cli import main as clicktower_main
    from clicktower.launcher.retrieval.mining import mine

    shards = _own_negatives_input(synth_dir, tmp_path / "in")
    source = {s["__key__"]: s for shard in load_manifest(shards)["shards"] for s in iter_shard(shard["path"])}
    assert clicktower_main(["mine", "--model", "no/such-model", "--manifest", shards, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "20 of 40 samples have hard negatives and 40 teacher scores already" in err[0]
    assert "--existing (keep:" in err[0] and not (tmp_path / "x").exists()

    out = {}
    for policy in ("keep", "merge", "replace"):
        caplog.clear()
        summary = mine(str(tiny_model), shards, str(tmp_path / policy), str(synth_dir / "catalog.jsonl"),
                       ranks=(2, 40), margin=-2, negatives=3, existing=policy)
        assert f"mine --existing {policy}: 20 of 40 samples" in caplog.text
        assert summary["existing"] == policy and summary["samples_with_hard_negatives"] == 20
        out[policy] = {s["__key__"]: s for shard in load_manifest(str(tmp_path / policy))["shards"]
                       for s in iter_shard(shard["path"])}
    for key, s in source.items():
        own = [n["item_id"] for n in s["hard_negatives"]]
        kept, merged, replaced = (out[p][key] for p in ("keep", "merge", "replace"))
        if own:   # keep: untouched, teacher scores included; merge: own first; neither keeps scores
            assert [n["item_id"] for n in kept["hard_negatives"]] == own
            assert kept["teacher_scores"] == s["teacher_scores"]
            assert [n["item_id"] for n in merged["hard_negatives"]][:2] == own
            assert len(merged["hard_negatives"]) > 2
        else:
            assert "teacher_scores" not in kept and kept["hard_negatives"]
        assert "teacher_scores" not in merged and "teacher_scores" not in replaced
        assert len(replaced["hard_negatives"]) <= 3
