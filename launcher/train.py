"""Train a two-tower retrieval model.

    clicktower train --config configs/demo.yaml train.max_steps=50
    accelerate launch -m clicktower.launcher.train --config configs/demo.yaml

Reads top to bottom: parse the config, build every component, train, save, tear down.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from clicktower.data.loader import ClickPairLoader
from clicktower.data.shards import load_manifest
from clicktower.launcher.checkpoint import Checkpointer, find_resume_checkpoint
from clicktower.launcher.config import ConfigError, ExperimentConfig, load_config, to_dict
from clicktower.launcher.distributed import accelerator_kwargs, prepare_launch
from clicktower.launcher.errors import run_cli
from clicktower.launcher.optim import build_optimizer, build_scheduler
from clicktower.launcher.periodic_eval import PeriodicEvaluator
from clicktower.launcher.preemption import EXIT_PREEMPTED, Preempted, PreemptionHandler
from clicktower.launcher.trainer import Trainer
from clicktower.modeling.losses import ContrastiveLoss
from clicktower.modeling.towers import TwoTower


def parse_args(argv: list[str] | None) -> tuple[str, list[str]]:
    parser = argparse.ArgumentParser(prog="clicktower train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=20")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def train(cfg: ExperimentConfig) -> Path:
    """Run one experiment; returns the folder of the final towers.

    Args:
        cfg: the validated experiment config.
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
    loader = ClickPairLoader.from_config(cfg.data, manifest, cfg.train.batch_size, accelerator.process_index,
                                         accelerator.num_processes, cfg.train.seed, tokenizer,
                                         cfg.model.max_query_length, cfg.model.max_item_length)
    model = TwoTower.from_config(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    # The scheduler is stepped once per optimiser step on every rank, so accelerate must not
    # step it num_processes times (nor DeepSpeed's engine): it is not prepared.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    # Negatives from every rank when distributed: the loss gathers and scales (nothing else does).
    loss_fn = ContrastiveLoss.from_config(cfg.loss, accelerator.num_processes > 1)
    checkpointer = Checkpointer(accelerator, out, cfg.checkpoint)
    evaluator = None if cfg.eval.every_steps is None else PeriodicEvaluator(
        accelerator, accelerator.unwrap_model(model), tokenizer, cfg.eval, out,
        cfg.model.max_query_length, cfg.model.max_item_length)
    trainer = Trainer(accelerator, model, optimizer, scheduler, loader, loss_fn, cfg.train,
                      cfg.optim.max_grad_norm, cfg.loss.mask_duplicate_items, checkpointer,
                      PreemptionHandler(accelerator).install(), config_yaml, evaluator)
    trainer.start(find_resume_checkpoint(out, cfg.train.resume, cfg.checkpoint.verify_checksums))
    trainer.fit()  # raises Preempted after checkpointing when a stop signal arrived

    final = trainer.save_final(out / "final", tokenizer, cfg.model.max_query_length, cfg.model.max_item_length)
    accelerator.end_training()
    return final


def main(argv: list[str] | None = None) -> int:
    config_path, overrides = parse_args(argv)
    cfg = load_config(config_path, overrides)
    # One line per job, not per rank (the launcher sets RANK for every worker).
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        final = train(cfg)
    except Preempted as stop:
        if main_rank:
            print(f"{stop}; resume with train.resume=auto", flush=True)
        return EXIT_PREEMPTED
    if main_rank:
        print(f"saved {final}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
