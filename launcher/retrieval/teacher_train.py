"""Train a cross-encoder teacher on judged (query, item, grade) pairs (``clicktower teacher train``).

Pairs come from CSV/TSV/JSONL/Parquet files (named columns) or clicktower shards (each
sample's positive with its label, or 1 without one, and each hard negative at the lowest
grade). The loss is pointwise: binary cross-entropy towards the grade scaled to [0, 1]
(``clicktower.modeling.cross_encoder``; why: docs/teacher.md). One process; the data order is
a seeded permutation per epoch, so a step checkpoint (weights, optimizer, RNG, step) in
``OUT/checkpoint/`` resumes to the same weights as an uninterrupted run. The output folder is
the export: an ``AutoModel`` folder, its tokenizer, the head and ``clicktower_teacher.json``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clicktower.data.errors import DataError
from clicktower.data.sources import iter_records
from clicktower.launcher.errors import ConfigError
from clicktower.launcher.progress import bar, status
from clicktower.modeling.cross_encoder import CrossEncoder, grade_targets, pointwise_loss
from clicktower.modeling.towers import download_model

CHECKPOINT = "checkpoint/state.pt"
# Settings a resumed run may change: how long it runs and how often it saves.
_RESUMABLE_CHANGES = ("epochs", "max_steps", "save_every")


@dataclass
class TeacherConfig:
    """Settings of ``clicktower teacher train``.

    Args:
        model: base encoder: a folder, ``pkg://`` reference or Hugging Face Hub id.
        data: the judged pairs: a CSV/TSV/JSONL/Parquet file or a shard folder/manifest.
        out: output folder: the teacher (the export) and its resume checkpoint.
        query_field: column of the query text (files only).
        item_field: column of the item text (files only).
        label_field: column of the relevance grade or binary label (files only).
        grade_min: the grade mapped to target 0 (None: the lowest in the data).
        grade_max: the grade mapped to target 1 (None: the highest in the data).
        seed: seed of the head, the data order and dropout.
        lr: AdamW learning rate (constant after the warmup).
        warmup_steps: steps of linear learning-rate warmup.
        weight_decay: AdamW weight decay.
        epochs: passes over the pairs (used when ``max_steps`` is None).
        max_steps: optimizer steps (None: ``epochs`` passes).
        batch_size: pairs per step.
        max_length: token limit of the ``[CLS] query [SEP] item`` pair.
        save_every: steps between resume checkpoints (one is also kept at the end).
    """

    model: str
    data: str
    out: str
    query_field: str = "query"
    item_field: str = "item_text"
    label_field: str = "label"
    grade_min: float | None = None
    grade_max: float | None = None
    seed: int = 0
    lr: float = 2e-5
    warmup_steps: int = 0
    weight_decay: float = 0.01
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    max_length: int = 128
    save_every: int = 500

    def __post_init__(self) -> None:
        positive = {"lr": self.lr, "epochs": self.epochs, "batch_size": self.batch_size,
                    "max_length": self.max_length, "save_every": self.save_every}
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} {value}: must be > 0")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError("--warmup-steps and --weight-decay must be >= 0")
        if None not in (self.grade_min, self.grade_max) and not self.grade_min < self.grade_max:
            raise ConfigError(f"--grade-min {self.grade_min} --grade-max {self.grade_max}: need min < max")


def read_pairs(config: TeacherConfig) -> list[tuple[str, str, float | None]]:
    """``(query, item text, grade)`` of every pair; None grades are hard negatives (lowest grade).

    Args:
        config: where the pairs are and which columns hold them.
    """
    path = Path(config.data)
    if path.is_dir() or path.name == "manifest.json":
        return _shard_pairs(str(path))
    pairs = []
    wanted = (config.query_field, config.item_field, config.label_field)
    for row, record in iter_records(str(path)):
        missing = [name for name in wanted if name not in record]
        if missing:
            raise DataError(f"{path}: row {row}: no column {', '.join(map(repr, missing))} (it has "
                            f"{', '.join(map(repr, record))}); name them with --query-field/--item-field/--label-field")
        try:
            grade = float(record[config.label_field])
        except (TypeError, ValueError):
            raise DataError(f"{path}: row {row}: column {config.label_field!r}: not a number: "
                            f"{record[config.label_field]!r}") from None
        if not math.isfinite(grade):
            raise DataError(f"{path}: row {row}: column {config.label_field!r}: not finite: {grade}")
        pairs.append((str(record[config.query_field]), str(record[config.item_field]), grade))
    if not pairs:
        raise DataError(f"{path}: no pairs (the file is empty)")
    return pairs


def _shard_pairs(manifest: str) -> list[tuple[str, str, float | None]]:
    """Shard samples as pairs: the positive (its label, else 1) and each hard negative (None)."""
    from clicktower.launcher.retrieval.sample_writer import iter_manifest_samples
    from clicktower.data.shards import load_manifest

    pairs: list[tuple[str, str, float | None]] = []
    for s in iter_manifest_samples(load_manifest(manifest)):
        pairs.append((s["query"], s["item_text"], float(s["label"]) if s.get("label") is not None else 1.0))
        pairs.extend((s["query"], n["item_text"], None) for n in s.get("hard_negatives") or ())
    if not pairs:
        raise DataError(f"{manifest}: no samples")
    return pairs


def grade_range(pairs: list[tuple[str, str, float | None]], config: TeacherConfig) -> tuple[float, float]:
    """``(grade_min, grade_max)``: the config's, else the data's lowest and highest grade
    (with hard negatives, the lowest is at most 0); a grade outside a given range is an error.

    Args:
        pairs: the pairs of ``read_pairs``.
        config: ``grade_min``/``grade_max`` where set.
    """
    grades = [g for _, _, g in pairs if g is not None]
    low, high = min(grades), max(grades)
    if len(grades) < len(pairs):  # hard negatives: the lowest grade, at most 0 (unlabelled clicks are 1)
        lo = min(low, 0.0) if config.grade_min is None else config.grade_min
    else:
        lo = low if config.grade_min is None else config.grade_min
    hi = high if config.grade_max is None else config.grade_max
    if low < lo or high > hi:
        raise DataError(f"{config.data}: labels range over [{low:g}, {high:g}], outside --grade-min {lo:g} "
                        f"--grade-max {hi:g}")
    if not lo < hi:
        raise DataError(f"{config.data}: every label is {lo:g}: nothing to learn (judged-irrelevant pairs or "
                        f"hard negatives are needed, or set --grade-min/--grade-max)")
    return lo, hi


def batch_rows(num_pairs: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The pair rows of ``step``: a seeded permutation per epoch, cut into batches (the last
    of an epoch may be short). A function of the step alone: what makes resume exact.

    Args:
        num_pairs: pairs in the data.
        batch_size: pairs per step.
        seed: the run's seed.
        step: the 0-based step.
    """
    per_epoch = math.ceil(num_pairs / batch_size)
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_pairs)
    return order[index * batch_size:(index + 1) * batch_size]


def train_teacher(config: TeacherConfig) -> dict:
    """Train (or resume) the teacher and write its folder; returns the run's summary.

    Args:
        config: the run's settings.
    """
    from transformers import AutoTokenizer

    started = time.perf_counter()
    pairs = read_pairs(config)  # bad data fails before the model loads
    lo, hi = grade_range(pairs, config)
    base = download_model(config.model)
    if not Path(base).is_dir():
        raise FileNotFoundError(f"{config.model}: no such model folder")
    torch.manual_seed(config.seed)
    # One device: a GPU when there is one (dropout then draws from its RNG, saved too).
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = CrossEncoder.from_encoder(base, config.seed).to(device)
    tokenizer = AutoTokenizer.from_pretrained(base)
    # Longer pairs than the encoder has positions for would fail at the first long pair.
    max_length = min(config.max_length, getattr(model.encoder.config, "max_position_embeddings", config.max_length))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total = config.max_steps or config.epochs * math.ceil(len(pairs) / config.batch_size)
    start = _resume(config, model, optimizer)
    grades = torch.tensor([lo if g is None else g for _, _, g in pairs])
    model.train()
    shown, loss = bar(total, "teacher train", unit="step"), torch.tensor(float("nan"))
    shown.update(start)
    for step in range(start, total):
        rows = batch_rows(len(pairs), config.batch_size, config.seed, step)
        enc = tokenizer([pairs[r][0] for r in rows], [pairs[r][1] for r in rows], padding=True,
                        truncation=True, max_length=max_length, return_tensors="pt")
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
        loss = pointwise_loss(model(**enc.to(device)), grade_targets(grades[rows], lo, hi).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        shown.update(1)
        shown.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % config.save_every == 0 or step + 1 == total:
            _save_checkpoint(config, model, optimizer, step + 1)
    shown.close()
    meta = {"objective": "pointwise_bce", "score": "logit of P(relevant); grade_min -> 0, grade_max -> 1",
            "head": "linear on the CLS token's last hidden state", "grade_min": lo, "grade_max": hi,
            "max_length": max_length, "base_model": config.model, "steps": total, "pairs": len(pairs)}
    model.save_pretrained(config.out, tokenizer, meta)
    status(f"teacher train: wrote {config.out} ({total} steps on {len(pairs)} pairs)")
    return {**meta, "out": config.out, "resumed_from_step": start, "seconds": round(time.perf_counter() - started, 3),
            "final_loss": round(float(loss.detach()), 6) if total > start else None}  # None: nothing left to train


def _comparable(config: TeacherConfig) -> dict:
    """The settings that must match between a checkpoint and the run resuming it."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in _RESUMABLE_CHANGES}


def _save_checkpoint(config: TeacherConfig, model: CrossEncoder, optimizer, step: int) -> None:
    """Everything that defines the step, written to a temporary file then renamed (an
    interruption mid-write leaves the previous checkpoint whole)."""
    path = Path(config.out) / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": torch.get_rng_state(), "config": _comparable(config),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save(state, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def _resume(config: TeacherConfig, model: CrossEncoder, optimizer) -> int:
    """Load ``OUT/checkpoint`` when there is one; returns the step to continue from (0: fresh)."""
    path = Path(config.out) / CHECKPOINT
    if not path.is_file():
        return 0
    state = torch.load(path, weights_only=False, map_location="cpu")
    changed = {k: (v, state["config"].get(k)) for k, v in _comparable(config).items() if state["config"].get(k) != v}
    if changed:
        diff = ", ".join(f"{k}={old!r} -> {new!r}" for k, (new, old) in changed.items())
        raise ConfigError(f"{path}: written with other settings ({diff}); resume with the same ones or "
                          f"choose another --out")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    status(f"teacher train: resuming from step {state['step']} ({path})")
    return int(state["step"])


def write_summary(config: TeacherConfig, summary: dict) -> None:
    """``OUT/training.json``: the summary the command prints.

    Args:
        config: the run's settings (its output folder).
        summary: ``train_teacher``'s result.
    """
    (Path(config.out) / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
