"""Train a two-tower retrieval model from a validated config: ``train(cfg)``.

Reads top to bottom: check the inputs, build every component, resume or start, train, save the
final towers. ``clicktower train`` and ``accelerate launch -m clicktower.launcher.train`` call
it (``launcher/commands/train.py``); so can Python code.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from clicktower.data.loader import ClickPairLoader, PairTokenizer, Rank
from clicktower.data.shards import load_manifest
from clicktower.launcher.engine.checkpoint import Checkpointer
from clicktower.launcher.engine.config import ExperimentConfig, to_dict
from clicktower.launcher.engine.distributed import accelerator_kwargs, peer_loss_errors, prepare_launch
from clicktower.launcher.engine.loop import TrainLoop, save_final
from clicktower.launcher.engine.metrics import MetricsLog
from clicktower.launcher.engine.observers import (CheckpointObserver, EvalObserver, MetricsObserver,
                                                  SampleKeysObserver)
from clicktower.launcher.engine.optim import Optimization, build_optimizer, build_scheduler
from clicktower.launcher.engine.periodic_eval import PeriodicEvaluator
from clicktower.launcher.engine.preemption import PreemptionHandler
from clicktower.launcher.engine.step import TrainStep
from clicktower.launcher.errors import ConfigError
from clicktower.modeling.losses import ContrastiveLoss
from clicktower.modeling.towers import TwoTower


def train(cfg: ExperimentConfig) -> Path:
    """Run one experiment; returns the folder of the final towers.

    Args:
        cfg: the validated experiment config.

    Raises:
        Preempted: a stop signal arrived; the state was checkpointed first.
        PeerLost: another process, host or link died (bounded by ``train.collective_timeout_s``).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    if not cfg.data.manifests():
        raise ConfigError("data.train_manifest (or data.mix) is required for training")
    # Everything a user can get wrong on disk is checked before anything is written.
    manifests = [load_manifest(m) for m in cfg.data.manifests()]
    manifest = manifests if cfg.data.mix is not None else manifests[0]
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                              **accelerator_kwargs(cfg.train.collective_timeout_s))
    out = Path(cfg.train.output_dir)
    config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml)
    set_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    prepare_launch(accelerator, cfg.train.batch_size, cfg.optim.max_grad_norm)  # DeepSpeed "auto"s, checks
    loader = ClickPairLoader(cfg.data, manifest, cfg.train.batch_size,
                             Rank(accelerator.process_index, accelerator.num_processes), cfg.train.seed,
                             PairTokenizer(tokenizer, cfg.model.max_query_length, cfg.model.max_item_length))
    model = TwoTower.from_config(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    # The scheduler is stepped once per optimiser step on every rank, so accelerate must not
    # step it num_processes times (nor DeepSpeed's engine): it is not prepared.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    # Negatives from every rank when distributed: the loss gathers and scales (nothing else does).
    loss_fn = ContrastiveLoss.from_config(cfg.loss, accelerator.num_processes > 1)
    step = TrainStep(accelerator, model, loss_fn, Optimization(optimizer, scheduler, cfg.optim.max_grad_norm),
                     cfg.train.grad_cache_chunk)

    metrics = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process)
    checkpointer = Checkpointer(accelerator, out, cfg.checkpoint, config_yaml)
    observers = [MetricsObserver(metrics, cfg.train, accelerator.is_main_process)]
    if cfg.train.sample_keys_log:
        observers.append(SampleKeysObserver(out, accelerator.process_index))
    if cfg.eval.every_steps is not None:
        evaluator = PeriodicEvaluator(accelerator, accelerator.unwrap_model(model), tokenizer, cfg.eval, out)
        observers.append(EvalObserver(evaluator, metrics))
    observers.append(CheckpointObserver(checkpointer, PreemptionHandler(accelerator).install()))
    loop = TrainLoop(step, loader, cfg.train, observers)

    resume_state = checkpointer.resume(cfg.train.resume)  # collective when resuming
    with peer_loss_errors(lambda: loop.step, cfg.train.collective_timeout_s, lambda: checkpointer.last_saved):
        loop.fit(resume_state)  # raises Preempted after checkpointing when a stop signal arrived
    final = save_final(accelerator, model, out / "final", tokenizer)
    accelerator.end_training()
    return final
