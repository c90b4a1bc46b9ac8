"""The typed batch of click pairs: ``PairBatch`` (what the loader yields) and ``PairLabels``
(what the loss reads besides the embeddings).

``PairBatch`` owns the layout of the item rows: the batch's B items, then its H hard
negatives, in one tensor (one item-tower call embeds both). Only this module slices it:
``split_items`` for a whole batch, ``chunks`` for GradCache. A new per-sample field goes into
``PairLabels`` (``kernels/labels.py``), the loader's ``collate`` and the loss (docs/training.md, "Adding a
per-sample field").
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

# The labels live beside the loss kernels that read them, so that the loss (modeling) and the
# loader (data) share the type without importing each other; re-exported here.
from clicktower.kernels.labels import PairLabels

__all__ = ["BatchChunk", "PairBatch", "PairLabels"]

# The token tensors a tokenised batch carries, named as TwoTower.forward takes them.
TOKEN_INPUTS = ("query_input_ids", "query_attention_mask", "item_input_ids", "item_attention_mask")


@dataclass(frozen=True)
class BatchChunk:
    """One GradCache chunk of a batch: the model inputs of a run of its pairs followed by a
    slice of its hard negatives (item rows), and which rows those are.

    Args:
        inputs: model inputs (``TwoTower(**inputs)``) of the chunk.
        pairs: ``(start, end)`` of the chunk's pairs among the batch's B pairs.
        negatives: ``(start, end)`` of the chunk's hard negatives among the batch's H.
    """

    inputs: dict[str, torch.Tensor]
    pairs: tuple[int, int]
    negatives: tuple[int, int]

    def split_items(self, item_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's item embeddings as (its pairs' items, its hard negatives; maybe empty).

        Args:
            item_emb: the item tower's output for ``inputs``.
        """
        count = self.pairs[1] - self.pairs[0]
        return item_emb[:count], item_emb[count:]


@dataclass
class PairBatch:
    """A batch of B (query, item) pairs as the loader yields it.

    Args:
        keys: the samples' keys (``shard-row``), in order.
        queries: query texts.
        items: item texts of the pairs (hard negatives not included).
        labels: ids, weights, exclusions, hard negatives' ids and owners, teacher scores.
        tokens: token tensors (``query_input_ids``, ``query_attention_mask``,
            ``item_input_ids``, ``item_attention_mask``), item rows being the B items then
            the H hard negatives; empty without a tokenizer.
        item_features: [B + H, F] float item feature vectors (rows without one: zeros); the
            model reads them only with ``item_features_present``.
        item_features_present: [B + H] bool, the item rows that have a vector.
        hard_negatives: each sample's ``hard_negatives`` as read (all of them, texts and ids),
            when any sample has some.
        counts: counters from building the batch (bad samples, I/O, missing features), which
            the loader adds to its own and clears: the batch may be built in a worker process.
    """

    keys: list[str]
    queries: list[str]
    items: list[str]
    labels: PairLabels = field(default_factory=PairLabels)
    tokens: dict[str, Any] = field(default_factory=dict)
    item_features: torch.Tensor | None = None
    item_features_present: torch.Tensor | None = None
    hard_negatives: list[list[dict]] | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_pairs(self) -> int:
        """B, the pairs (and the leading item rows)."""
        return len(self.keys)

    @property
    def num_hard_negatives(self) -> int | None:
        """H, the item rows after the pairs' items; None when the batch has no hard negatives."""
        ids = self.labels.hard_negative_ids
        return None if ids is None else int(ids.shape[0])

    def to(self, device: torch.device | str) -> "PairBatch":
        """This batch with its tensors (tokens, features, labels) on ``device``.

        Args:
            device: the target device.
        """
        return replace(self, tokens={k: _to(v, device) for k, v in self.tokens.items()},
                       item_features=_to(self.item_features, device),
                       item_features_present=_to(self.item_features_present, device),
                       labels=self.labels.to(device))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of ``TwoTower.forward``: token tensors, and the item feature
        rows when the batch has ``item_features_present``."""
        missing = [name for name in TOKEN_INPUTS if name not in self.tokens]
        if missing:
            raise ValueError(f"the batch has no {', '.join(missing)}: build the loader with a PairTokenizer")
        inputs = {name: self.tokens[name] for name in TOKEN_INPUTS}
        if self.item_features_present is not None:
            inputs.update(item_features=self.item_features, item_features_present=self.item_features_present)
        return inputs

    def split_items(self, item_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The item tower's output as (the pairs' items [B, D], the hard negatives [H, D], or
        None without hard negatives).

        Args:
            item_emb: [B + H, D] embeddings of the batch's item rows.
        """
        hard = self.num_hard_negatives
        if hard is None:
            return item_emb, None
        if item_emb.shape[0] != self.num_pairs + hard:
            raise ValueError(f"{item_emb.shape[0]} item embeddings for {self.num_pairs} items and {hard} "
                             f"hard negatives")
        return item_emb[:self.num_pairs], item_emb[self.num_pairs:]

    def chunks(self, num_chunks: int) -> list[BatchChunk]:
        """The batch cut into ``num_chunks`` GradCache chunks: near-equal runs of pairs, each
        with the matching near-equal slice of the hard negatives (some maybe empty), so that
        each chunk embeds its items and negatives in ONE item-tower call.

        Args:
            num_chunks: how many chunks (at most B).
        """
        inputs, pairs = self.model_inputs(), self.num_pairs
        pair_spans = _spans(pairs, num_chunks)
        neg_spans = _spans(self.num_hard_negatives or 0, num_chunks)
        return [BatchChunk(_chunk_inputs(inputs, p, g, pairs), p, g) for p, g in zip(pair_spans, neg_spans)]


def _to(value: Any, device: torch.device | str) -> Any:
    return value.to(device) if torch.is_tensor(value) else value


def _spans(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` consecutive near-equal ``(start, end)`` ranges covering ``range(n)`` (some
    empty when ``n < parts``)."""
    bounds = [0]
    for size in (len(t) for t in torch.arange(n).tensor_split(parts)):
        bounds.append(bounds[-1] + size)
    return list(zip(bounds[:-1], bounds[1:]))


def _chunk_inputs(inputs: dict[str, torch.Tensor], pairs: tuple[int, int], negatives: tuple[int, int],
                  num_pairs: int) -> dict[str, torch.Tensor]:
    """One chunk's model inputs: the queries and items of its pairs, the items followed by its
    slice of the hard negatives (item rows from ``num_pairs`` on). Every item-side input
    (``item_*``: tokens, masks, feature rows) is sliced alike."""
    (a, b), (c, d) = pairs, negatives
    rows = None
    if d > c:
        rows = torch.cat([torch.arange(a, b), torch.arange(num_pairs + c, num_pairs + d)])
    out = {}
    for key, value in inputs.items():
        if not key.startswith("item_"):
            out[key] = value[a:b]
        else:
            out[key] = value[a:b] if rows is None else value[rows.to(value.device)]
    return out
