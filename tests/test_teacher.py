"""clicktower teacher: the cross-encoder's targets and loss, exact resume, bad input, RocketQA's
filter, and end to end: scores on 2 ranks equal 1 rank's and train with loss.distill_weight."""
from __future__ import annotations

import json
import math

import pytest
import torch

from clicktower.data.errors import DataError
from clicktower.data.shards import iter_shard, load_manifest, write_shards
from clicktower.data.sources import FieldMap
from clicktower.launcher.cli import main as clicktower_main
from clicktower.launcher.errors import ConfigError
from clicktower.launcher.retrieval.teacher_score import drop_close_negatives, sample_pairs, split_scores
from clicktower.launcher.retrieval.teacher_train import (TeacherConfig, batch_rows, grade_range, read_pairs,
                                                          train_teacher)
from clicktower.modeling.cross_encoder import CrossEncoder, grade_targets, pointwise_loss

from conftest import MINILM, TINY_CONFIG, clicktower
from dist_launch import accelerate_launch
import test_mine

tiny_model = test_mine.tiny_model  # the fixture of the tiny two-tower model that mine embeds with


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 1-layer BERT folder with MiniLM's tokenizer: the teacher's base encoder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from clicktower.modeling.towers import resolve_model_path

    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model_path(MINILM)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def judged_csv(synth_dir, tmp_path_factory):
    """The synthetic judged eval queries as (query, item_text, grade) rows, grades 1-3."""
    import csv

    catalog = {r["item_id"]: r["item_text"] for r in map(json.loads, (synth_dir / "catalog.jsonl").open())}
    path = tmp_path_factory.mktemp("judged") / "judged.csv"
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["query", "item_text", "grade"])
        for record in map(json.loads, (synth_dir / "eval.jsonl").open()):
            out.writerows([record["query"], catalog[item], grade] for item, grade in record["relevance"].items())
    return path


@pytest.fixture(scope="module")
def negative_shards(synth_dir, tmp_path_factory):
    """96 synthetic pairs as shards of 40, each with 2 hard negatives from the catalog."""
    catalog = [json.loads(line) for line in (synth_dir / "catalog.jsonl").open()]
    rows = [json.loads(line) for line in (synth_dir / "train.jsonl").read_text("utf-8").splitlines()[:96]]
    for i, row in enumerate(rows):
        negs = [c for c in catalog if c["item_id"] != row["item_id"]][(7 * i) % 200:(7 * i) % 200 + 2]
        row["hard_negatives"] = [{"item_id": c["item_id"], "item_text": c["item_text"]} for c in negs]
    folder = tmp_path_factory.mktemp("negshards")
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    write_shards([str(folder / "train.jsonl")], str(folder / "shards"), FieldMap(hard_negatives="hard_negatives"),
                 shard_size=40)
    return folder / "shards"


@pytest.fixture(scope="module")
def teacher_dir(tiny_bert, judged_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    train_teacher(TeacherConfig(model=str(tiny_bert), data=str(judged_csv), out=str(out), label_field="grade",
                                max_steps=4, batch_size=16, lr=1e-3))
    return out


def _samples(folder):
    return [s for shard in load_manifest(str(folder))["shards"] for s in iter_shard(shard["path"])]


@pytest.mark.unit
def test_grade_targets_and_pointwise_loss():
    grades = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0])
    assert grade_targets(grades, 1.0, 3.0).tolist() == [0.0, 0.5, 1.0, 0.0, 1.0]
    logits = torch.tensor([0.3, -1.0, 2.0, 0.0, 0.5])
    targets = grade_targets(grades, 1.0, 3.0)
    manual = -(targets * torch.log(torch.sigmoid(logits)) + (1 - targets) * torch.log(1 - torch.sigmoid(logits)))
    assert torch.allclose(pointwise_loss(logits, targets), manual.mean(), atol=1e-6)


@pytest.mark.unit
def test_cross_encoder_reads_query_and_item_together(tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    model = CrossEncoder.from_encoder(str(tiny_bert), seed=3).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    enc = tok(["cordless drill", "red rug"], ["drill driver 18v", "drill driver 18v"], padding=True, return_tensors="pt")
    assert (enc["input_ids"][:, 0] == tok.cls_token_id).all() and (enc["token_type_ids"] == 1).any()
    with torch.no_grad():
        scores = model(**enc)
    assert scores.shape == (2,) and scores[0] != scores[1]   # the same item, another query: another score
    model.save_pretrained(tmp_path / "t", tok, {"max_length": 32})
    loaded, meta = CrossEncoder.from_pretrained(tmp_path / "t")
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(**enc), scores) and meta == {"max_length": 32}


@pytest.mark.unit
def test_shards_give_positives_and_hard_negatives_at_the_lowest_grade(negative_shards):
    config = TeacherConfig(model="unused", data=str(negative_shards), out="unused")
    pairs = read_pairs(config)
    source = _samples(negative_shards)
    assert len(pairs) == 96 * 3 and pairs[0] == (source[0]["query"], source[0]["item_text"], 1.0)
    assert pairs[1] == (source[0]["query"], source[0]["hard_negatives"][0]["item_text"], None)
    assert grade_range(pairs, config) == (0.0, 1.0)
    with pytest.raises(DataError, match=r"labels range over \[1, 1\], outside --grade-min 2"):
        grade_range(pairs, TeacherConfig(model="x", data="x", out="x", grade_min=2, grade_max=3))
    with pytest.raises(DataError, match="every label is 1: nothing to learn"):
        grade_range([("q", "i", 1.0)], config)


@pytest.mark.unit
def test_batch_rows_are_a_seeded_permutation_per_epoch():
    epoch0 = [batch_rows(10, 4, 7, s).tolist() for s in range(3)]
    assert [len(b) for b in epoch0] == [4, 4, 2] and sorted(sum(epoch0, [])) == list(range(10))
    assert batch_rows(10, 4, 7, 3).tolist() != epoch0[0] and batch_rows(10, 4, 8, 0).tolist() != epoch0[0]
    assert batch_rows(10, 4, 7, 1).tolist() == epoch0[1]


@pytest.mark.unit
def test_resume_gives_the_weights_of_an_uninterrupted_run(tiny_bert, judged_csv, tmp_path):
    """3 steps then 3 more from OUT/checkpoint = 6 at once: 60 pairs, 16 a batch, so the resume
    is mid-epoch and the run crosses an epoch; dropout on (the RNG state is in the checkpoint)."""
    data = tmp_path / "judged.csv"
    data.write_text("".join(judged_csv.read_text().splitlines(keepends=True)[:61]))

    def run(out, steps, lr=1e-3):
        return train_teacher(TeacherConfig(model=str(tiny_bert), data=str(data), out=str(out), label_field="grade",
                                           max_steps=steps, batch_size=16, lr=lr, save_every=2, seed=5,
                                           max_length=32))

    run(tmp_path / "a", 6)
    assert run(tmp_path / "b", 3)["resumed_from_step"] == 0
    assert run(tmp_path / "b", 6)["resumed_from_step"] == 3
    a, _ = CrossEncoder.from_pretrained(tmp_path / "a")
    b, _ = CrossEncoder.from_pretrained(tmp_path / "b")
    fresh = CrossEncoder.from_encoder(str(tiny_bert), seed=5)
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(x, y), name
    assert any(not torch.equal(x, z) for x, z in zip(a.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(ConfigError, match="other settings .*lr=0.001 -> 0.0001"):
        run(tmp_path / "b", 6, lr=1e-4)


@pytest.mark.unit
def test_bad_input_is_one_line_and_exit_status_2(tiny_bert, judged_csv, negative_shards, tmp_path, capsys):
    def error(*args):
        assert clicktower_main(["teacher", "train", "--out", str(tmp_path / "out"), *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("clicktower: error: "), lines
        return lines[0]

    base = ("--model", str(tiny_bert), "--data", str(judged_csv))
    assert "no column 'label' (it has 'query', 'item_text', 'grade')" in error(*base)
    (tmp_path / "empty.csv").write_text("query,item_text,label\n")
    assert "empty file" in error("--model", str(tiny_bert), "--data", str(tmp_path / "empty.csv"))
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty" in error("--model", str(tiny_bert), "--data", str(tmp_path / "empty.jsonl"))
    assert "outside --grade-min 1 --grade-max 2" in error(*base, "--label-field", "grade", "--grade-max", "2")
    assert "not a number" in error("--model", str(tiny_bert), "--data", str(judged_csv), "--label-field", "query")
    assert "no_such_model" in error("--model", str(tmp_path / "no_such_model"), "--data", str(judged_csv),
                                    "--label-field", "grade")
    assert "--lr" in error(*base, "--label-field", "grade", "--lr", "0")
    assert not (tmp_path / "out").exists()
    for teacher, message in ((tiny_bert, "not a teacher folder"), (tmp_path / "nothing", "no such teacher folder")):
        assert clicktower_main(["teacher", "score", "--teacher", str(teacher), "--input", str(negative_shards),
                                "--output", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    assert clicktower_main(["mine", "--model", str(tiny_bert), "--manifest", str(negative_shards), "--out",
                            str(tmp_path / "m"), "--teacher", str(tiny_bert)]) == 2
    assert "--teacher" in capsys.readouterr().err and not (tmp_path / "m").exists()


@pytest.mark.unit
def test_drop_close_negatives_is_rocketqas_rule():
    negatives = [[{"item_id": "a"}, {"item_id": "b"}, {"item_id": "c"}], [{"item_id": "d"}], []]
    scores = [[2.0, 1.9, 1.0, 2.5], [0.0, -0.5], [1.0]]
    kept, dropped = drop_close_negatives(negatives, scores, margin=0.5)
    # 1.9 > 2.0 - 0.5 and 2.5 > 1.5 go; 1.0 stays; -0.5 is not > -0.5: stays.
    assert [[n["item_id"] for n in k] for k in kept] == [["b"], ["d"], []] and dropped == 2
    kept, dropped = drop_close_negatives(negatives, scores, margin=-10.0)
    assert dropped == 0 and kept == negatives
    samples = [{"query": "q", "item_text": "p"}, {"query": "r", "item_text": "s"}]
    pairs = sample_pairs(samples, [[{"item_text": "n1"}, {"item_text": "n2"}], []])
    assert pairs == [("q", "p"), ("q", "n1"), ("q", "n2"), ("r", "s")]
    assert split_scores(torch.arange(4.0), [[{}, {}], []]) == [[0.0, 1.0, 2.0], [3.0]]


@pytest.mark.e2e
@pytest.mark.slow
def test_teacher_score_on_two_ranks_equals_one_and_distillation_trains(teacher_dir, negative_shards, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    result = clicktower("teacher", "score", "--teacher", str(teacher_dir), "--input", str(negative_shards),
                        "--output", str(one))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["pairs_scored"] == 96 * 3 and summary["num_processes"] == 1
    result = accelerate_launch("cpu_2proc_ddp", ["-m", "clicktower.launcher.teacher", "score", "--teacher",
                                                 str(teacher_dir), "--input", str(negative_shards), "--output", str(two)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["num_processes"] == 2
    a, b, source = _samples(one), _samples(two), _samples(negative_shards)
    assert "teacher_scores" in load_manifest(str(one))["fields"]
    assert [s["item_id"] for s in a] == [s["item_id"] for s in source]
    assert [[n["item_id"] for n in s["hard_negatives"]] for s in a] == \
        [[n["item_id"] for n in s["hard_negatives"]] for s in source]
    for x, y in zip(a, b):
        assert len(x["teacher_scores"]) == 3 and all(map(math.isfinite, x["teacher_scores"]))
        assert x["teacher_scores"] == pytest.approx(y["teacher_scores"], abs=1e-4)
    assert len({tuple(s["teacher_scores"]) for s in a}) > 90   # real scores, not a constant

    run = tmp_path / "run"
    result = clicktower("train", "--config", str(TINY_CONFIG), f"data.train_manifest={one}",
                        "loss.distill_weight=0.5", "data.hard_negatives_per_query=2", "train.max_steps=2",
                        f"train.output_dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "final").is_dir()


@pytest.mark.e2e
def test_mine_with_a_teacher_drops_negatives_scored_near_the_positive(tiny_model, teacher_dir, synth_dir, tmp_path):
    """The 4-step teacher's scores spread little (std ~0.003): margin 0 drops about half."""
    from clicktower.launcher.retrieval.teacher_score import load_teacher, score_pairs

    lines = (synth_dir / "train.jsonl").read_text("utf-8").splitlines(keepends=True)[:200]
    (tmp_path / "train.jsonl").write_text("".join(lines), "utf-8")
    write_shards([str(tmp_path / "train.jsonl")], str(tmp_path / "shards"), FieldMap(), shard_size=100)
    out = tmp_path / "mined"
    result = clicktower("mine", "--model", str(tiny_model), "--manifest", str(tmp_path / "shards"), "--out", str(out),
                        "--ranks", "2", "40", "--negatives", "3", "--margin", "-2",
                        "--teacher", str(teacher_dir), "--teacher-margin", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["teacher_candidates"] == 200 * 6 and 0 < summary["teacher_dropped"] < summary["teacher_candidates"]
    assert 0 < summary["teacher_seconds"] < summary["mining_seconds"]
    model, tokenizer, meta = load_teacher(str(teacher_dir))
    samples = _samples(out)
    kept = sum(len(s["hard_negatives"]) for s in samples)
    assert 0 < kept <= summary["teacher_candidates"] - summary["teacher_dropped"]
    negatives = [s["hard_negatives"] for s in samples]
    for scores in split_scores(score_pairs(model, tokenizer, sample_pairs(samples, negatives), meta["max_length"]),
                               negatives):
        assert all(s <= scores[0] + 1e-5 for s in scores[1:])


@pytest.mark.unit
def test_teacher_eval_ranks_each_querys_judged_items_by_the_teachers_scores(teacher_dir, synth_dir, tmp_path,
                                                                            capsys):
    from clicktower.launcher.retrieval.metrics import query_metrics
    from clicktower.launcher.retrieval.readers import read_catalog, read_judged_queries
    from clicktower.launcher.retrieval.teacher_score import load_teacher, score_pairs

    queries, catalog = str(tmp_path / "eval.jsonl"), str(synth_dir / "catalog.jsonl")
    (tmp_path / "eval.jsonl").write_text("".join((synth_dir / "eval.jsonl").read_text().splitlines(keepends=True)[:20]))
    assert clicktower_main(["teacher", "eval", "--teacher", str(teacher_dir), "--queries", queries,
                            "--catalog", catalog, "--min-relevance", "2"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, tokenizer, meta = load_teacher(str(teacher_dir))
    text = dict(zip(*read_catalog(catalog)))
    ndcg = []
    for query, grades in read_judged_queries(queries):   # one query at a time: other batches than eval's
        items = list(grades)
        scores = score_pairs(model, tokenizer, [(query, text[i]) for i in items], meta["max_length"]).tolist()
        ranked = [i for _, i in sorted(zip(scores, items), key=lambda pair: -pair[0])]
        ndcg.append(query_metrics(ranked, grades, 2.0)["ndcg@10"])
    assert got["mode"] == "rerank" and got["num_queries"] == len(ndcg) == 20
    assert got["ndcg@10"] == pytest.approx(sum(ndcg) / len(ndcg), abs=1e-6)
