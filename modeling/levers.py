"""The loss's two stateful levers: popularity estimates for the logQ correction of in-batch
negatives (Yi et al., RecSys 2019) and a cross-batch memory of item embeddings (XBM, Wang et
al., CVPR 2020).

``CountTable`` gives log p(id) from counts recorded at shard time; ``StreamingFrequency`` from
the hashed arrays of last-seen step and average gap of Yi et al.; ``CrossBatchMemory`` keeps
the last ``size`` gathered items (detached) with their item and query ids, so the loss's
false-negative rules apply to them. ``LossState`` bundles what must go into checkpoints. The
loss (:mod:`clicktower.modeling.losses`) drives them; docs/training.md, "Popularity
correction" and "Cross-batch memory".
"""
from __future__ import annotations

import math
from typing import Any

import torch


class CountTable:
    """log p(id) = log(count(id) / total) from counts recorded at shard time; an id without
    a count (not in the table) counts 1, the rarest an id can be; id -1 has no estimate.

    Args:
        ids: [n] int64 ids (the loader's ``stable_id`` of the item id or query text).
        counts: [n] their counts (> 0).
    """

    def __init__(self, ids: torch.Tensor, counts: torch.Tensor) -> None:
        if ids.shape != counts.shape or ids.dim() != 1:
            raise ValueError("ids and counts must be 1-d tensors of the same length")
        order = torch.argsort(ids)
        self.ids, self.counts = ids[order].to(torch.int64), counts[order].to(torch.float64)
        if self.counts.numel() and not bool((self.counts > 0).all()):
            raise ValueError("counts must be > 0")
        self.total = float(self.counts.sum()) if self.counts.numel() else 1.0

    def observe(self, ids: torch.Tensor) -> None:
        """Counts are fixed: nothing to learn from a step."""

    def log_probability(self, ids: torch.Tensor) -> torch.Tensor:
        """[n] float64 log p of each id (NaN for -1).

        Args:
            ids: [n] int64 ids.
        """
        table_ids, counts = self.ids.to(ids.device), self.counts.to(ids.device)
        if not counts.numel():
            count = torch.ones(ids.shape, dtype=torch.float64, device=ids.device)
        else:
            at = torch.searchsorted(table_ids, ids).clamp_max(table_ids.numel() - 1)
            count = torch.where(table_ids[at] == ids, counts[at], torch.ones_like(counts[at]))
        out = torch.log(count / self.total)
        return torch.where(ids == -1, torch.full_like(out, math.nan), out)

    def state_dict(self) -> dict[str, Any]:
        return {}  # rebuilt from the shards' manifest: nothing step-dependent

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class StreamingFrequency:
    """The streaming frequency estimator of Yi et al. (2019, Algorithm 2) on hashed arrays.

    Bucket h = id mod ``buckets`` keeps the step it was last seen (``last``) and an
    exponential average of the steps between occurrences (``gap``): each occurrence at step t
    does ``gap <- (1 - alpha) gap + alpha (t - last)``, ``last <- t`` (repeats within a step
    add gaps of 0; the very first occurrence sets ``gap = t + 1``, the steps so far). 1 / gap
    estimates the id's occurrences per step,
    so p(id) = 1 / (gap * draws), draws the ids observed per step. Ids sharing a bucket share
    the estimate (collisions over-estimate p, as in the paper).

    Args:
        buckets: size of the hashed arrays.
        alpha: the average's learning rate (0 < alpha <= 1).
    """

    def __init__(self, buckets: int, alpha: float) -> None:
        if buckets < 1 or not 0 < alpha <= 1:
            raise ValueError(f"buckets must be >= 1 and 0 < alpha <= 1, got {buckets}, {alpha}")
        self.buckets, self.alpha = int(buckets), float(alpha)
        self.last = torch.full((self.buckets,), -1, dtype=torch.int64)
        self.gap = torch.zeros(self.buckets, dtype=torch.float64)
        self.steps = 0
        self.draws = 1

    def observe(self, ids: torch.Tensor) -> None:
        """One step's ids (every rank's: all ranks hold the same state).

        Args:
            ids: [n] int64 ids; -1 is skipped.
        """
        ids = ids[ids != -1].cpu()
        buckets, counts = torch.unique(torch.remainder(ids, self.buckets), return_counts=True)
        t, keep = self.steps, 1 - self.alpha
        last = self.last[buckets]
        seen = last >= 0
        # The paper's update, once per occurrence: the first with the steps since the last
        # sighting, each repeat within the step with a gap of 0 (so the average stays the
        # mean steps between occurrences; averaging gap / c per step would be biased low).
        first = torch.where(seen, keep * self.gap[buckets] + self.alpha * (t - last).double(),
                            torch.full_like(self.gap[buckets], t + 1.0))
        self.gap[buckets] = first * keep ** (counts - 1).double()
        self.last[buckets] = t
        self.steps, self.draws = t + 1, max(int(ids.numel()), 1)

    def log_probability(self, ids: torch.Tensor) -> torch.Tensor:
        """[n] float64 log p of each id (NaN for -1); an id never seen gets the estimate of
        one sighting in all steps so far.

        Args:
            ids: [n] int64 ids.
        """
        h = torch.remainder(ids, self.buckets).cpu()
        gap = torch.where(self.last[h] >= 0, self.gap[h], torch.full_like(self.gap[h], float(max(self.steps, 1))))
        out = (-torch.log(gap) - math.log(self.draws)).to(ids.device)
        return torch.where(ids == -1, torch.full_like(out, math.nan), out)

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last.clone(), "gap": self.gap.clone(), "steps": self.steps, "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["last"].shape != self.last.shape:
            raise ValueError(f"streaming popularity state has {state['last'].shape[0]} buckets, "
                             f"the config {self.buckets}")
        self.last, self.gap = state["last"].clone(), state["gap"].clone()
        self.steps, self.draws = int(state["steps"]), int(state["draws"])


def logq_bias(source, ids: torch.Tensor, draws: int) -> torch.Tensor:
    """``-log(draws * p(id))``, the logQ correction of a key drawn ``draws`` times among the
    call's corrected keys (the expected number of times it appears among them); 0 for id -1.

    Args:
        source: a ``CountTable`` or ``StreamingFrequency``.
        ids: [n] int64 ids.
        draws: how many corrected keys the call has.
    """
    log_p = source.log_probability(ids)
    bias = -(log_p + math.log(max(draws, 1)))
    return torch.where(torch.isnan(bias), torch.zeros_like(bias), bias)


class CrossBatchMemory:
    """The item embeddings of the last batches (detached), newest first, at most ``size``
    rows, with the item id and the query id of the pair each came from. Entries count as
    extra keys only once ``warmup`` pushes have happened (it fills during the warm-up).

    Args:
        size: rows kept (FIFO: staleness is at most ``size`` / items per step steps).
        warmup: pushes (loss calls) before the entries are used.
    """

    def __init__(self, size: int, warmup: int) -> None:
        self.size, self.warmup = int(size), int(warmup)
        self.emb: torch.Tensor | None = None
        self.item_ids: torch.Tensor | None = None
        self.query_ids: torch.Tensor | None = None
        self.pushes = 0

    def entries(self, like: torch.Tensor):
        """``(emb, item_ids, query_ids)`` on ``like``'s device and dtype, or None (empty or
        warming up).

        Args:
            like: the call's keys.
        """
        if self.emb is None or self.pushes < self.warmup or not self.emb.shape[0]:
            return None
        dev = like.device
        return self.emb.to(device=dev, dtype=like.dtype), self.item_ids.to(dev), self.query_ids.to(dev)

    def push(self, emb: torch.Tensor, item_ids: torch.Tensor, query_ids: torch.Tensor) -> None:
        """Add one step's gathered items (the same on every rank), dropping the oldest.

        Args:
            emb: [G, D] item embeddings (detached here).
            item_ids: [G] int64 (-1: unknown).
            query_ids: [G] int64 (-1: unknown).
        """
        emb = emb.detach()
        if self.emb is not None and self.emb.shape[1:] == emb.shape[1:]:
            dev = emb.device
            emb = torch.cat([emb, self.emb.to(device=dev, dtype=emb.dtype)])
            item_ids = torch.cat([item_ids, self.item_ids.to(dev)])
            query_ids = torch.cat([query_ids, self.query_ids.to(dev)])
        self.emb, self.item_ids, self.query_ids = emb[:self.size], item_ids[:self.size], query_ids[:self.size]
        self.pushes += 1

    def state_dict(self) -> dict[str, Any]:
        return {"emb": self.emb, "item_ids": self.item_ids, "query_ids": self.query_ids, "pushes": self.pushes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.emb, self.item_ids, self.query_ids = state["emb"], state["item_ids"], state["query_ids"]
        self.pushes = int(state["pushes"])


class LossState:
    """What the loss keeps from step to step (popularity estimates, memory), as one object
    with ``state_dict`` / ``load_state_dict`` for the checkpoint component.

    Args:
        parts: name -> an object with ``state_dict`` / ``load_state_dict``.
    """

    def __init__(self, parts: dict[str, Any]) -> None:
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.parts) - set(state))
        if missing:
            raise ValueError(f"the checkpoint's loss state lacks {missing} (saved with other loss levers?)")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
