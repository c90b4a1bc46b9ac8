"""Settings that would silently do nothing in this run, checked once its data and length are known.

Distillation with nothing to distil is refused (the user asked for a loss term the run would
not have); a warm-up as long as the run is warned about (short smoke runs of a config with a
warm-up are legitimate, but the learning rate then never reaches ``optim.lr``).
"""
from __future__ import annotations

import logging
from typing import Any

from clicktower.launcher.errors import ConfigError

logger = logging.getLogger("clicktower")


def check_distillation(cfg: Any, manifest_fields: list[list[str]]) -> None:
    """Refuse ``loss.distill_weight`` > 0 where no sample can carry a teacher score.

    Args:
        cfg: the ``ExperimentConfig``.
        manifest_fields: the sample fields of each manifest the loader reads.

    Raises:
        ConfigError: naming the key, the data and the fix.
    """
    weight = cfg.loss.distill_weight
    if not weight:
        return
    if not any("teacher_scores" in fields for fields in manifest_fields):
        source = (f"data.train_manifest ({cfg.data.train_manifest})" if cfg.data.mix is None
                  else "none of the data.mix manifests")
        raise ConfigError(f"loss.distill_weight={weight:g}: {source} has no teacher scores, so nothing would be "
                          f"distilled; shard the data with `clicktower shard --teacher-field NAME`, or set "
                          f"loss.distill_weight=0")
    if cfg.data.hard_negatives_per_query == 0:
        raise ConfigError(f"loss.distill_weight={weight:g}: distillation compares the teacher's and the model's "
                          f"scores of each pair's own hard negatives, and data.hard_negatives_per_query=0 reads "
                          f"none; set data.hard_negatives_per_query to the number of scored negatives")


def check_warmup(cfg: Any, steps: int, main_process: bool) -> None:
    """Warn (once, on the main process) when ``optim.warmup_steps`` is not shorter than the run.

    Args:
        cfg: the ``ExperimentConfig``.
        steps: the optimiser steps the run plans.
        main_process: whether this process prints.
    """
    warmup = cfg.optim.warmup_steps
    if main_process and warmup and warmup >= steps:
        logger.warning("optim.warmup_steps=%d is not shorter than the run (%d steps): the learning rate never "
                       "reaches optim.lr=%g (the last step uses %.0f%% of it); lower optim.warmup_steps",
                       warmup, steps, cfg.optim.lr, 100 * (steps - 1) / warmup)
