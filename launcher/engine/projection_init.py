"""``model.projection_init=pca``: the towers' projection starts at the principal axes of their
own pooled embeddings of the first training pairs (queries and items together), so that the
leading dimensions of the embedding hold the most of its scores from the first step: what a
Matryoshka prefix (``loss.matryoshka_dims``) or a served ``--dim`` cut keeps. With
``projection_dim`` equal to the hidden size it is a rotation, and the full embedding scores
exactly as the pretrained towers do.

The main process fits the axes on its own first batches; every rank gets them (one broadcast),
before the model is wrapped, trained or restored (a resume then loads the trained weights).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from clicktower.data.batch import PairBatch
from clicktower.launcher.errors import ConfigError
from clicktower.modeling.towers import TwoTower, principal_axes


def pooled_sample(model: TwoTower, batches: Iterable[PairBatch], pairs: int, device: Any) -> torch.Tensor:
    """[N, H] the pooled (pre-projection) query and item embeddings of the first ``pairs``
    pairs of ``batches`` (hard negatives' items included), in eval mode, without gradients.

    Args:
        model: the towers, before any training.
        batches: training batches, tokenized.
        pairs: pairs to read (at least one batch is read).
        device: where to run the encoders.
    """
    rows, seen = [], 0
    training = model.training
    model.eval()  # no dropout: the axes of the embeddings the model actually makes
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = batch.to(device).model_inputs()
                rows.append(model.query_tower.pooled(inputs["query_input_ids"], inputs["query_attention_mask"]))
                rows.append(model.item_tower.pooled(inputs["item_input_ids"], inputs["item_attention_mask"],
                                                    inputs.get("item_features"), inputs.get("item_features_present")))
                seen += batch.num_pairs
                if seen >= pairs:
                    break
    finally:
        model.train(training)
    if not rows:
        raise ConfigError("model.projection_init=pca: the training data gave no batch to fit the projection on")
    return torch.cat(rows).float().cpu()


def init_projection_pca(model: TwoTower, batches: Callable[[], Iterable[PairBatch]], pairs: int, device: Any,
                        is_main: bool, share: Callable[[Any], Any] | None) -> None:
    """Set both towers' projection to the principal axes of ``pooled_sample`` (the main
    process's), strongest first.

    Args:
        model: the towers (``model.projection_dim`` set, <= the hidden size).
        batches: makes the training batches to read (called on the main process only).
        pairs: ``model.projection_init_pairs``.
        device: where to run the encoders.
        is_main: this is the main process (it fits; the others receive).
        share: sends the main process's object to every rank (None: one process).
    """
    if any(hasattr(param, "ds_shape") for param in model.parameters()):
        # ZeRO-3's zero.Init built the towers as empty partitions: no rank holds the weights
        # that the fit must run (nor the projection it must set) until DeepSpeed gathers them.
        raise ConfigError("model.projection_init=pca does not run with DeepSpeed ZeRO-3's zero3_init_flag: true "
                          "(the towers are built partitioned); set zero3_init_flag: false in the accelerate config, "
                          "or model.projection_init=random")
    out_dim, hidden = model.query_tower.projection.weight.shape
    if out_dim > hidden:
        raise ConfigError(f"model.projection_init=pca: model.projection_dim={out_dim} is more than the encoder's "
                         f"{hidden} dimensions (principal axes span at most {hidden})")
    axes = principal_axes(pooled_sample(model, batches(), pairs, device), out_dim) if is_main else None
    if share is not None:
        axes = share(axes)
    model.set_projection(axes)  # copy_ casts to the projection's dtype
