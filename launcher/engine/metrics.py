"""The run's metric files: ``metrics.jsonl`` (written during training, read by ``clicktower
plot``), the per-rank sample-key logs, and the PNG drawn from them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from clicktower.data.errors import DataError


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (main process only).

    Args:
        path: the ``metrics.jsonl`` file.
        enabled: False on non-main ranks.
    """

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def reset(self) -> None:
        """Start a new file (a fresh run); a resumed run appends to the old one instead."""
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def resume(self, step: int, saved: Path | None) -> None:
        """Continue after a resume from ``step``: the history up to that step, each step once.

        Args:
            step: the step resumed from (the records after it are replayed, hence dropped).
            saved: the checkpoint's copy of the file (None: it has none, e.g. written by an
                earlier version): it replaces this file, which may be missing (a fresh disk)
                or hold the steps the stopped run made after the checkpoint.
        """
        if not self.enabled:
            return
        source = saved if saved is not None and saved.is_file() else self.path
        if not source.is_file():
            return
        kept = [line for line in source.read_text(encoding="utf-8").splitlines(keepends=True)
                if _record_step(line) <= step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            fh.writelines(kept)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a no-op on non-main ranks).

        Args:
            record: a JSON-serialisable mapping.
        """
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())  # a crash must not lose the lines already reported


def _record_step(line: str) -> float:
    """The ``step`` of one ``metrics.jsonl`` line (a torn or foreign line counts as after
    every step: a resume drops it)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


class SampleKeysLog:
    """Appends the sample keys one rank trained on, one JSON line per step.

    A step logged twice (before a kill, and again after the resume) keeps its last line, as
    in ``metrics.jsonl``.

    Args:
        path: this rank's ``sample_keys/rank_R.jsonl``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def reset(self) -> None:
        """Start a new file (a fresh run); a resumed run appends to the old one instead."""
        self.path.unlink(missing_ok=True)

    def write(self, step: int, keys: list[str], epochs: list[int]) -> None:
        """Append one step's record.

        Args:
            step: the optimiser step just done (1-based).
            keys: the step's sample keys on this rank, all micro-batches in order.
            epochs: the loader epoch of each key.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            # Closed (so handed to the OS) at once, no fsync: it must survive a SIGKILL of this
            # process, which the page cache does; a power cut is not what it is for.
            fh.write(json.dumps({"step": step, "keys": list(keys), "epochs": list(epochs)}) + "\n")


PANELS = (("loss", "training loss"), ("temperature", "temperature"), ("pairs_per_sec", "pairs / s"))
RETRIEVAL_PREFIXES = ("eval/", "recall@", "mrr@", "ndcg@")


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (one JSON object per line)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (is this a training output folder?)")
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise DataError(f"{path}: line {line_no}: invalid JSON") from None
    if not records:
        raise DataError(f"{path}: empty file, nothing to plot")
    return records


def plot_metrics(records: list[dict], out: Path, title: str = "") -> Path:
    """Draw one panel per quantity against step and save a PNG.

    Args:
        records: metrics records with a ``step`` key.
        out: the PNG path.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    retrieval = sorted({k for r in records for k in r
                        if k.startswith(RETRIEVAL_PREFIXES) and isinstance(r[k], (int, float))})
    panels = [p for p in PANELS if any(p[0] in r for r in records)]
    count = len(panels) + (1 if retrieval else 0)
    fig, axes = plt.subplots(1, count, figsize=(4.2 * count, 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if retrieval:
        ax = axes[0][-1]
        for key in retrieval:
            points = [(r["step"], r[key]) for r in records if key in r]
            ax.plot(*zip(*points), marker="o", label=key)
        ax.set_title("retrieval")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
