"""Train a two-tower retrieval model from a validated config: ``train(cfg)``.

Reads top to bottom: check the inputs, build every component, resume or start, train, save the
final towers. ``clicktower train`` and ``accelerate launch -m clicktower.launcher.train`` call
it (``launcher/commands/train.py``); so can Python code.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import yaml

from clicktower.data.loader import ClickPairLoader, PairTokenizer, Rank, popularity_counts
from clicktower.launcher.engine.checkpoint import Checkpointer
from clicktower.launcher.engine.config import ExperimentConfig, to_dict
from clicktower.launcher.engine.distributed import (accelerator_kwargs, broadcast_object, gradient_accumulation_steps,
                                                     peer_loss_errors, prepare_launch, resolve_numerics,
                                                     set_numerics)
from clicktower.launcher.engine.loop import TrainLoop, planned_steps, save_final
from clicktower.launcher.engine.metrics import MetricsLog
from clicktower.launcher.engine.noop_checks import check_distillation, check_warmup
from clicktower.launcher.engine.observers import (CheckpointObserver, EvalObserver, MetricsObserver,
                                                  SampleKeysObserver, storage_counters)
from clicktower.launcher.engine.optim import Optimization, build_optimizer, build_scheduler
from clicktower.launcher.engine.periodic_eval import PeriodicEvaluator
from clicktower.launcher.engine.preemption import PreemptionHandler
from clicktower.launcher.engine.projection_init import init_projection_pca
from clicktower.launcher.engine.step import TrainStep
from clicktower.launcher.engine.tracking import Tracker, accelerator_tracking_kwargs
from clicktower.launcher.errors import ConfigError
from clicktower.launcher.progress import status
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
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    if not cfg.data.manifests():
        raise ConfigError("data.train_manifest (or data.mix) is required for training")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path)
    accelerator = Accelerator(**accelerator_kwargs(cfg.train.collective_timeout_s, cfg.train.mixed_precision),
                              **accelerator_tracking_kwargs(cfg.train.report_to, cfg.train.output_dir))
    # Precision (null: the launcher's) and determinism (null: by device) as run: config.yaml records these.
    cfg = replace(cfg, train=resolve_numerics(accelerator, cfg.train))
    set_seed(cfg.train.seed)
    set_numerics(accelerator.device, cfg.train.deterministic)  # deterministic kernels, or TF32 on CUDA

    prepare_launch(accelerator, cfg.train.batch_size, cfg.optim.max_grad_norm)  # DeepSpeed "auto"s, checks
    # Everything a user can get wrong is checked before anything is written: the loader reads
    # its manifests (every rank) and checks the shard files (one rank, the others get its answer).
    rank = Rank(accelerator.process_index, accelerator.num_processes)
    loader = build_loader(cfg, rank, tokenizer)
    accumulation = gradient_accumulation_steps(accelerator)
    # With train.epochs the run ends at the end of that epoch, wherever a resume restarts it
    # (TrainLoop.fit plans the steps from the restored data position); this is a fresh run's.
    steps = planned_steps(cfg.train, 0, loader, accumulation)
    if steps < 1:
        raise ConfigError(f"train.epochs={cfg.train.epochs}: {len(loader)} batches per epoch make no optimiser "
                          f"step of {accumulation} micro-batches")
    check_distillation(cfg, loader.manifest_fields)  # settings that would do nothing: refused or warned
    check_warmup(cfg, steps, accelerator.is_main_process)
    out = Path(cfg.train.output_dir)
    status(f"train: {steps} steps of {cfg.train.batch_size * rank.world_size * accumulation} pairs from "
           f"{', '.join(map(str, cfg.data.manifests()))} into {out}; loading the model "
           f"({cfg.model.name_or_path or 'a random BERT, model.bert_config'}) and any checkpoint to resume",
           accelerator.is_main_process)
    config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml)
    model = TwoTower.from_config(cfg.model)
    if cfg.model.projection_init == "pca":  # before anything is trained, wrapped or restored
        # The sample is read by a loader of its own (the training loader's position stays at 0),
        # over the manifests the training loader already read and checked.
        init_projection_pca(model.to(accelerator.device), lambda: build_loader(cfg, rank, tokenizer, loader.manifests),
                            cfg.model.projection_init_pairs, accelerator.device, accelerator.is_main_process,
                            broadcast_object if rank.world_size > 1 else None)
    optimizer = build_optimizer(model, cfg.optim)
    # By pairs read: exact when a resume changes the global batch (docs/training.md, "Epochs").
    scheduler = build_scheduler(optimizer, cfg.optim, steps, cfg.train.batch_size * rank.world_size * accumulation)
    # The scheduler is stepped once per optimiser step on every rank, so accelerate must not
    # step it num_processes times (nor DeepSpeed's engine): it is not prepared.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    # Negatives from every rank when distributed: the loss gathers and scales (nothing else does).
    loss_fn = build_loss(cfg, rank, accelerator)
    step = TrainStep(accelerator, model, loss_fn, Optimization(optimizer, scheduler, cfg.optim.max_grad_norm),
                     cfg.train.grad_cache_chunk)

    metrics = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process)
    checkpointer = Checkpointer(accelerator, out, cfg.checkpoint, config_yaml, metrics)
    tracker = Tracker(accelerator, out.name, to_dict(cfg))  # TensorBoard, W&B...: train.report_to
    counters = storage_counters(accelerator, loader, checkpointer)  # read and upload retries, all ranks
    observers = [MetricsObserver(metrics, cfg.train, accelerator.is_main_process, tracker, counters)]
    if cfg.train.sample_keys_log:
        observers.append(SampleKeysObserver(out, accelerator.process_index))
    if cfg.eval.every_steps is not None:
        evaluator = PeriodicEvaluator(accelerator, accelerator.unwrap_model(model), tokenizer, cfg.eval, out)
        observers.append(EvalObserver(evaluator, metrics, tracker))
    observers.append(CheckpointObserver(checkpointer, PreemptionHandler(accelerator).install()))
    loop = TrainLoop(step, loader, cfg.train, observers)

    resume_state = checkpointer.resume(cfg.train.resume)  # collective when resuming
    with peer_loss_errors(lambda: loop.step, cfg.train.collective_timeout_s, lambda: checkpointer.last_saved):
        loop.fit(resume_state)  # raises Preempted after checkpointing when a stop signal arrived
    final = save_final(accelerator, model, out / "final", tokenizer)
    checkpointer.finish(final)  # the last save committed; final/ and best/ uploaded (remote_dir)
    accelerator.end_training()
    return final


def build_loader(cfg: ExperimentConfig, rank: Rank, tokenizer, checked: list[dict] | None = None) -> ClickPairLoader:
    """The training data of ``cfg.data`` for this rank, tokenized for ``cfg.model``.

    Args:
        cfg: the experiment config.
        rank: this process's rank and world size.
        tokenizer: the towers' tokenizer.
        checked: None: the manifests are read and their shard files checked, distributed by
            one rank that shares its answer (every rank must call). Another loader's
            ``manifests`` of the same config: taken as they are, by this process alone.
    """
    tokens = PairTokenizer(tokenizer, cfg.model.max_query_length, cfg.model.max_item_length)
    if checked is not None:
        return ClickPairLoader(cfg.data, checked, cfg.train.batch_size, rank, cfg.train.seed, tokens,
                               features_dim=cfg.model.item_features_dim)
    return ClickPairLoader.from_config(cfg.data, cfg.train.batch_size, rank, cfg.train.seed, tokens,
                                       broadcast_object if rank.world_size > 1 else None,
                                       features_dim=cfg.model.item_features_dim)


def build_loss(cfg: ExperimentConfig, rank: Rank, accelerator) -> ContrastiveLoss:
    """The loss of ``cfg.loss`` for this rank; its state (streaming popularity estimates,
    cross-batch memory) registered with the checkpoint, so that a resume is exact.

    Args:
        cfg: the experiment config (``loss``; ``data`` for the shards' popularity counts).
        rank: this process's rank and world size.
        accelerator: the training accelerator.
    """
    counts = None
    if cfg.loss.popularity_correction == "logq" and cfg.loss.popularity_source == "counts":
        counts = popularity_counts(cfg.data.manifests(), cfg.data.storage_options)
    loss_fn = ContrastiveLoss.from_config(cfg.loss, rank=rank.rank, world_size=rank.world_size,
                                          popularity_counts=counts)
    if loss_fn.state is not None:
        # The same on every rank (each updates it with every rank's ids and items): the
        # main process's copy is the one saved, as for any registered object.
        accelerator.register_for_checkpointing(loss_fn.state)
    return loss_fn
