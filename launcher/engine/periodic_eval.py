"""Retrieval evaluation during training, sharded over ranks, keeping the best model.

Every ``eval.every_steps`` steps each rank embeds its slice of the catalog and of the held-out
queries; the catalog embeddings are all-gathered, each rank scores its queries against the
whole catalog, and the per-query metrics are gathered to the main process, which writes
``eval/...`` metrics to ``metrics.jsonl`` and, when ``eval.metric`` improves, the towers to
``OUTPUT_DIR/best/`` (with ``best.json``: step and metrics). The best so far (score, step,
metric) is part of every checkpoint (``state_dict``), so a resumed run replaces ``best/`` only
with a better model.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clicktower.launcher.engine.distributed import gathered_parameters
from clicktower.launcher.retrieval.embedding import EMBED_BATCH_SIZE, embed_sharded
from clicktower.launcher.retrieval.defaults import MIN_RELEVANCE
from clicktower.launcher.retrieval.metrics import METRIC_NAMES, exact_topk, mean_metrics, query_metrics
from clicktower.launcher.retrieval.readers import read_catalog_features, read_judged_queries

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Eval section of the experiment config.

    Args:
        every_steps: evaluate every N optimiser steps (None: never during training).
        queries: judged queries JSONL (``query``, ``relevance`` per item id).
        catalog: catalog to retrieve from (``item_id``, ``item_text``).
        min_relevance: grade from which an item counts as relevant.
        metric: the metric that picks the best model (saved to ``OUTPUT_DIR/best``).
        batch_size: texts per forward pass while embedding.
    """

    every_steps: int | None = None
    queries: str | None = None
    catalog: str | None = None
    min_relevance: float = MIN_RELEVANCE
    metric: str = "ndcg@10"
    batch_size: int = EMBED_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.every_steps is not None:
            if self.every_steps < 1:
                raise ValueError(f"eval.every_steps must be >= 1, got {self.every_steps}")
            if not self.queries or not self.catalog:
                raise ValueError("eval.every_steps needs eval.queries and eval.catalog")
        if self.metric not in METRIC_NAMES:
            raise ValueError(f"eval.metric must be one of {', '.join(METRIC_NAMES)}, got {self.metric!r}")


class PeriodicEvaluator:
    """Runs the held-out evaluation from inside the training loop (collective).

    Args:
        accelerator: the training accelerator.
        model: the unwrapped ``TwoTower`` (its token limits are the model config's).
        tokenizer: its tokenizer.
        cfg: eval config.
        output_dir: run folder (``best/`` goes there).
    """

    def __init__(self, accelerator: Any, model: Any, tokenizer: Any, cfg: EvalConfig,
                 output_dir: str | Path) -> None:
        self.acc, self.model, self.tokenizer, self.cfg = accelerator, model, tokenizer, cfg
        self.out = Path(output_dir)
        self.judged = read_judged_queries(cfg.queries)
        dim = model.item_tower.features_dim
        # Bad catalog vectors: the item is embedded without its vector (counted by the reader).
        self.ids, self.texts, self.features = read_catalog_features(cfg.catalog, "features" if dim else None, dim)
        self.best = -math.inf
        self.best_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        """The best evaluation so far, saved in every checkpoint: ``score`` (None before
        any), ``step`` and ``metric``."""
        return {"metric": self.cfg.metric, "score": self.best if math.isfinite(self.best) else None,
                "step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's ``state_dict()``: ``best/`` is replaced only by a better
        score. A best by another ``eval.metric`` is not comparable: the next evaluation
        replaces ``best/`` (with a warning).

        Args:
            state: the saved best.
        """
        if state.get("score") is None:
            return
        if state.get("metric") != self.cfg.metric:
            logger.warning("eval.metric=%s, but the best model so far was chosen by %s (step %s): the next "
                           "evaluation replaces best/", self.cfg.metric, state.get("metric"), state.get("step"))
            return
        self.best, self.best_step = float(state["score"]), state.get("step")

    def due(self, step: int) -> bool:
        return self.cfg.every_steps is not None and step % self.cfg.every_steps == 0

    def _embed(self, tower: Any, texts: list[str], limit: int, features: Any = None,
               progress: str | None = None) -> torch.Tensor:
        """Every row of ``texts`` on every rank, each rank embedding its slice."""
        return embed_sharded(tower, self.tokenizer, texts, limit, self.acc.device, self.cfg.batch_size, features,
                             progress)

    @torch.no_grad()
    def run(self, step: int) -> dict[str, Any]:
        """Evaluate now; returns the ``metrics.jsonl`` record (on every rank).

        Args:
            step: the current optimiser step.
        """
        catalog = self._embed(self.model.item_tower, self.texts, self.model.max_item_length, self.features,
                              f"eval at step {step}: catalog")
        queries = self._embed(self.model.query_tower, [q for q, _ in self.judged], self.model.max_query_length,
                              progress=f"eval at step {step}: queries")
        _, top = exact_topk(queries, catalog, k=100)
        per_query = [query_metrics([self.ids[i] for i in row], grades, self.cfg.min_relevance)
                     for row, (_, grades) in zip(top.tolist(), self.judged)]
        summary = mean_metrics(per_query)
        record = {"step": step, **{f"eval/{k}": v for k, v in summary.items()}}
        value = summary.get(self.cfg.metric, -math.inf)
        if value > self.best:
            self.best, self.best_step = value, step
            self.save_best(step, summary)
        return record

    def save_best(self, step: int, summary: dict[str, Any]) -> None:
        """Write the towers of the best model so far to ``OUTPUT_DIR/best`` (collective)."""
        with gathered_parameters(self.acc, self.model):  # ZeRO-3: full weights on the main rank
            if self.acc.is_main_process:
                best = self.out / "best"
                self.model.save_pretrained(best, self.tokenizer)
                (best / "best.json").write_text(json.dumps({"step": step, "metric": self.cfg.metric,
                                                            **summary}, indent=2) + "\n")
        self.acc.wait_for_everyone()
