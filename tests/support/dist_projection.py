"""Worker of ``tests/test_projection_init.py``'s 2-rank test: ``model.projection_init=pca``
fitted on the main process's batches and received by the other rank."""
from __future__ import annotations

import torch

from clicktower.data.batch import PairBatch
from clicktower.launcher.engine.distributed import broadcast_object
from clicktower.launcher.engine.projection_init import init_projection_pca
from clicktower.modeling.towers import TwoTower, TwoTowerConfig

TINY_BERT = dict(vocab_size=200, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=32)


def tiny_two_tower(shared: bool = True) -> TwoTower:
    """A random tiny BERT pair of towers with a 16 x 16 projection (the same weights for a seed)."""
    torch.manual_seed(0)
    cfg = TwoTowerConfig(bert_config=TINY_BERT, tokenizer="unused", projection_dim=16, shared_towers=shared,
                         projection_init="pca")
    return TwoTower.from_config(cfg)


def token_batches(seed: int, count: int = 3, size: int = 8) -> list[PairBatch]:
    """``count`` batches of ``size`` random token pairs (lengths 3-10, right padding)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(count):
        tokens = {}
        for side in ("query", "item"):
            ids = torch.randint(1, 200, (size, 10), generator=gen)
            lengths = torch.randint(3, 11, (size,), generator=gen)
            mask = (torch.arange(10)[None, :] < lengths[:, None]).long()
            tokens[f"{side}_input_ids"], tokens[f"{side}_attention_mask"] = ids * mask, mask
        keys = [f"{seed}-{b}-{i}" for i in range(size)]
        batches.append(PairBatch(keys=keys, queries=keys, items=keys, tokens=tokens))
    return batches


def pca_init_worker(rank: int, world: int) -> torch.Tensor:
    """Each rank reads its own batches (seeded by rank); the main process's axes are set on both."""
    model = tiny_two_tower()
    init_projection_pca(model, lambda: token_batches(rank), 16, "cpu", rank == 0, broadcast_object)
    return model.query_tower.projection.weight.detach().clone()
