"""One process of the gradient-accumulation test, run under `accelerate launch`.

    accelerate launch --config_file configs/accelerate/cpu_2proc_ddp.yaml \
        tests/support/dist_accumulate.py OUT.pt RUN_DIR

Runs the real ``TrainLoop.fit`` for ONE optimiser step with gradient_accumulation_steps=2 on
the tiny TwoTower of ``dist_gradcache.py`` (dropout off, fp32, SGD lr 1 so the update IS the
gradient) and a fake loader of fixed rank-dependent batches. Under DDP it also makes the
reference: two separate k=1 steps from the same init, one per micro-batch, whose mean
update the accumulated step must equal. Under DeepSpeed the config's
gradient_accumulation_steps is set to 2, as a DeepSpeed json with 2 would. Rank 0 writes
the parameters (gathered under ZeRO-3), counters and losses to OUT.pt.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator

from clicktower.launcher.engine.distributed import (accelerator_kwargs, deepspeed_plugin, gathered_parameters,
                                              prepare_launch)
from clicktower.launcher.engine.loop import TrainConfig, TrainLoop
from clicktower.launcher.engine.observers import MetricsObserver, SampleKeysObserver
from clicktower.launcher.engine.metrics import MetricsLog
from clicktower.launcher.engine.optim import Optimization
from clicktower.launcher.engine.step import TrainStep
from clicktower.modeling.losses import ContrastiveLoss
from dist_gradcache import BATCH, batch, prepared_sgd_model, world

STEPS = 2  # micro-batches per optimiser step


class FixedLoader:
    """Yields this rank's micro-batches 0, 1, 2, ... (keys name rank and micro-batch)."""

    epoch = 0

    def __init__(self, rank: int, count: int) -> None:
        self.rank, self.count, self.served = rank, count, 0

    def __iter__(self):
        for index in range(self.count):
            self.served += 1
            yield replace(batch(self.rank, index), keys=[f"r{self.rank}m{index}k{i}" for i in range(BATCH)])

    def error_counts(self) -> dict:
        return {}


def build(accelerator: Accelerator, run_dir: str, steps: int) -> TrainLoop:
    """A training loop (metrics and sample-keys observers) over a freshly seeded tiny model
    (the same init every call)."""
    accelerator.gradient_accumulation_steps = steps
    model, optimizer, scheduler = prepared_sgd_model(accelerator, 1.0)
    cfg = TrainConfig(batch_size=BATCH, max_steps=1, log_every_steps=1, output_dir=run_dir,
                      progress_bar=False, sample_keys_log=True)
    loader = FixedLoader(accelerator.process_index, 3)
    step = TrainStep(accelerator, model, ContrastiveLoss(True, **world(accelerator)),
                     Optimization(optimizer, scheduler, None))
    observers = [MetricsObserver(MetricsLog(Path(run_dir) / "metrics.jsonl", accelerator.is_main_process), cfg,
                                 accelerator.is_main_process),
                 SampleKeysObserver(run_dir, accelerator.process_index)]
    return TrainLoop(step, loader, cfg, observers)


def params(accelerator: Accelerator, loop: TrainLoop) -> dict[str, torch.Tensor]:
    with gathered_parameters(accelerator, loop.train_step.model):
        model = accelerator.unwrap_model(loop.train_step.model)
        return {k: v.detach().clone() for k, v in model.named_parameters()}


def main(out: str, run_dir: str) -> None:
    accelerator = Accelerator(**accelerator_kwargs())
    plugin = deepspeed_plugin(accelerator)
    if plugin is not None:
        # What a DeepSpeed json with "gradient_accumulation_steps": 2 gives (accelerate then
        # takes DeepSpeed's value at prepare).
        plugin.deepspeed_config["gradient_accumulation_steps"] = STEPS
    prepare_launch(accelerator, BATCH, None)
    result: dict = {}
    if plugin is None:
        # Reference: each micro-batch alone, one k=1 step from the same init each.
        singles, losses = [], []
        for index in range(STEPS):
            single = build(accelerator, run_dir + "_unused", 1)
            losses.append(float(single.train_step(batch(accelerator.process_index, index))))
            singles.append(params(accelerator, single))
        result["reference"] = {k: sum(p[k] for p in singles) / STEPS for k in singles[0]}
        result["reference_loss"] = sum(losses) / STEPS
        result["first_alone"] = singles[0]
    loop = build(accelerator, run_dir, STEPS)
    loop.fit()
    result.update(params=params(accelerator, loop), step=loop.step, served=loop.loader.served,
                  scheduler_steps=loop.train_step.scheduler.last_epoch,
                  accumulation_steps=loop.train_step.accumulation_steps)
    if accelerator.is_main_process:
        torch.save(result, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
