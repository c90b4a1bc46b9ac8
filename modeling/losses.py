"""Contrastive losses over (query, item) embedding pairs: in-batch NT-Xent / InfoNCE.

Row a of the query batch is paired with row a of the item batch; every other pair's item (and
every hard negative) is a negative for query a, and every other pair's query is a negative for
item a -- except false negatives: a candidate with the anchor's item id or query id, and the
items the anchor's ``exclude_ids`` list (id -1 never matches). Optionally (``distill_weight``)
a KL term towards a teacher's softmax over each pair's positive and own hard negatives.

With ``matryoshka_dims`` every listed prefix of the embeddings (re-normalised) is its own
contrastive problem on the same embeddings, weighted and summed (MatryoshkaLoss).

Across ranks (``cross_device`` with ``world_size`` > 1, given at construction) each local query
is scored against every rank's items and hard negatives, gathered with
:func:`clicktower.kernels.gather_with_grad`; the loss is the ONLY place that scales for
distributed gradients. The tiled kernels live in :mod:`clicktower.kernels`. More:
docs/training.md (the loss), docs/distributed.md, docs/fused-loss.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clicktower.kernels.labels import PairLabels
from clicktower.kernels import all_reduce_sum, gather_sizes, gather_with_grad
from clicktower.kernels import paired_logsumexp, positive_logits
from clicktower.kernels.collectives import all_reduce_max
from clicktower.modeling.levers import CountTable, CrossBatchMemory, LossState, StreamingFrequency, logq_bias

POPULARITY_CORRECTIONS = ("none", "logq")
POPULARITY_SOURCES = ("counts", "streaming")


@dataclass
class LossConfig:
    """Loss section of the experiment config.

    Args:
        symmetric: average the query->item and item->query losses.
        mask_duplicate_items: a pair (or hard negative) with the anchor's item id is not a
            negative, in both directions (needs item ids in the batch; the loader provides them).
        mask_duplicate_queries: a pair with the anchor's query id is not a negative, in both
            directions (query ids from the loader).
        cross_device: when training on several processes, use the items (negatives) of all
            ranks, not only the local batch. Without it the negative pool is the local batch.
        gather_queries: symmetric + cross-device only: all-gather the queries for a second
            item->query pass (true), or get both directions from ONE tiled pass, combining
            partial column log-sum-exps across ranks with all-reduces of N floats (false, the
            default: the same loss and gradients, O(N) instead of O(N x D) communication and
            half the loss FLOPs; see :class:`ContrastiveLoss`).
        distill_weight: weight of the distillation term (0: off). Pairs carrying teacher
            scores (``clicktower shard --teacher-field``) add ``distill_weight`` x KL(teacher
            softmax || student softmax) over their positive and their own hard negatives
            (``data.hard_negatives_per_query``), weighted and averaged like the contrastive
            term. A run whose data carries no teacher scores, or that reads no hard negatives,
            is refused rather than trained without the term.
        distill_temperature: the teacher's temperature: its softmax is over
            ``score / distill_temperature`` (the student's is over its own scaled logits).
        popularity_correction: ``none`` or ``logq``: subtract log q from every in-batch (and
            memory) negative's logit, q the expected number of times the key appears among the
            call's in-batch keys (items for query->item, queries for item->query); the
            positive's own logit and hard negatives are not corrected (docs/training.md,
            "Popularity correction").
        popularity_source: where q comes from: ``counts`` (recorded by ``clicktower shard`` in
            the manifest) or ``streaming`` (the estimator of Yi et al., kept in checkpoints).
        popularity_buckets: size of the streaming estimator's hashed arrays.
        popularity_alpha: the streaming estimator's learning rate.
        memory_size: item embeddings of past batches kept (detached) as extra negatives,
            global across ranks, newest first (0: off; XBM).
        memory_warmup_steps: loss calls before the memory's entries are used.
        memory_filter_margin: None (off) or m in [0, 1]: a memory entry whose dot product
            with a query (cosine for the towers' normalised embeddings) exceeds ``(1 - m)``
            times that query's positive is not a negative for it (sentence-transformers'
            GISTEmbed "relative" margin, with the model as its own guide). Stale memory copies
            of products that match the query as well as its click are false negatives the id
            rules cannot see (docs/training.md, "Cross-batch memory").
        matryoshka_dims: train these leading prefixes of the embedding, each as its own
            contrastive problem (``[384, 256, 128, 64]``; None: the full embedding only). A
            prefix shorter than the embedding is re-normalised (served as cosine at that
            size); list the full size too to keep training it. Same embeddings, one gather:
            no second encoder pass.
        matryoshka_weights: weight of each prefix's loss (default 1 each; the loss is the
            weighted sum, as sentence-transformers' ``MatryoshkaLoss``).
    """

    symmetric: bool = True
    mask_duplicate_items: bool = True
    mask_duplicate_queries: bool = True
    cross_device: bool = True
    gather_queries: bool = False
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    popularity_correction: str = "none"
    popularity_source: str = "counts"
    popularity_buckets: int = 1 << 20
    popularity_alpha: float = 0.01
    memory_size: int = 0
    memory_warmup_steps: int = 0
    memory_filter_margin: float | None = None
    matryoshka_dims: list[int] | None = None
    matryoshka_weights: list[float] | None = None

    def __post_init__(self) -> None:
        check_matryoshka(self.matryoshka_dims, self.matryoshka_weights)
        if self.popularity_correction not in POPULARITY_CORRECTIONS:
            raise ValueError(f"loss.popularity_correction must be one of {POPULARITY_CORRECTIONS}, "
                             f"got {self.popularity_correction!r}")
        if self.popularity_source not in POPULARITY_SOURCES:
            raise ValueError(f"loss.popularity_source must be one of {POPULARITY_SOURCES}, "
                             f"got {self.popularity_source!r}")
        if self.popularity_buckets < 1 or not 0 < self.popularity_alpha <= 1:
            raise ValueError("loss.popularity_buckets must be >= 1 and 0 < loss.popularity_alpha <= 1")
        if self.memory_size < 0 or self.memory_warmup_steps < 0:
            raise ValueError("loss.memory_size and loss.memory_warmup_steps must be >= 0")
        if self.memory_filter_margin is not None:
            if not self.memory_size:
                raise ValueError("loss.memory_filter_margin filters the cross-batch memory: set loss.memory_size too")
            if not 0 <= self.memory_filter_margin <= 1:
                raise ValueError(f"loss.memory_filter_margin must lie in [0, 1], got {self.memory_filter_margin}")
        if not 0 <= self.distill_weight < math.inf:
            raise ValueError(f"loss.distill_weight must be a finite number >= 0, got {self.distill_weight}")
        if not 0 < self.distill_temperature < math.inf:
            raise ValueError(f"loss.distill_temperature must be a finite number > 0, got {self.distill_temperature}")


class ContrastiveLoss(nn.Module):
    """InfoNCE / NT-Xent for two towers: each query against its clicked item and every other
    item of the (global) batch, plus hard negatives; optionally symmetric, with distillation.

    Inputs:

    ========================  =========  ====================================================
    argument                  shape      what
    ========================  =========  ====================================================
    ``query_emb``             [B, D]     local query embeddings (row a pairs with item a)
    ``item_emb``              [B, D]     embeddings of each query's clicked item
    ``logit_scale``           0-dim      inverse temperature (learned or fixed)
    ``labels`` (optional)     PairLabels ids, weights, exclusions, hard negatives' ids and
                                         owners, teacher scores; each field optional
    ``hard_negative_emb``     [H, D]     optional extra negatives for every query
    ========================  =========  ====================================================

    Returns the scalar fp32 loss. ``PairBatch`` (``clicktower.data``) gives ``labels`` and
    ``split_items`` gives the two item tensors; in a batch with ``labels.item_ids`` and
    ``query_ids`` a candidate with the anchor's item id or query text is not a negative
    (``mask_duplicate_items`` / ``mask_duplicate_queries``), nor are the items a pair's
    ``exclude_ids`` list. With ``distill_weight`` > 0, pairs with ``teacher_scores`` add a KL
    term over their positive and their own hard negatives (needs ``hard_negative_owner``).

    Relations: ``symmetric=False`` is the one-direction InfoNCE of
    :func:`clicktower.kernels.fused_contrastive_loss` (MultipleNegativesRankingLoss in
    sentence-transformers); ``symmetric=True`` adds item->query as the CLIP loss does
    (:func:`clicktower.kernels.fused_symmetric_contrastive_loss`); ``world_size`` > 1 with
    ``cross_device`` makes every rank's items (and hard negatives) negatives, as OpenCLIP's
    ``gather_with_grad``, and the result equals the single-process loss over the global batch.

    Example::

        loss_fn = ContrastiveLoss.from_config(LossConfig(), rank=0, world_size=1)
        batch = next(iter(loader))                       # a PairBatch
        query_emb, item_rows, scale = model(**batch.model_inputs())
        items, hard = batch.split_items(item_rows)
        loss_fn(query_emb, items, scale, batch.labels, hard).backward()

    The maths. Per rank the loss is

        sum over local pairs a of w_a * CE_a  /  (sum of w over the global batch / W)

    where CE_a is pair a's cross-entropy (symmetric: the mean of its query->item and
    item->query ones) against every rank's items followed by every rank's hard negatives, w
    the sample weights (1 without ``weights``: the denominator is then G / W, G the global
    number of pairs) and W the world size. The mean of this loss over ranks is the
    single-process weighted mean loss over the global batch, exact also when ranks hold
    uneven batches (the last batch of an epoch), and the gradient each rank gets for its
    local embeddings (through the gather's backward) is W times the gradient of that
    single-process loss; DDP's / DeepSpeed's averaging over W ranks then makes exactly the
    update of one process holding the whole global batch. With one process (or
    ``cross_device=False``) it is the plain in-batch weighted mean. A global batch whose
    weights are all 0 (weights are >= 0) has loss 0 and a zero gradient on every rank (the
    denominator is taken as 1 there: every term is 0 x CE); ``last_total_weight`` keeps the
    global total of the last forward.

    Args:
        symmetric: also compute item->query (each local item against every rank's queries)
            and return the mean of both directions.
        cross_device: gather keys from all ``world_size`` ranks (with ``world_size`` > 1).
        gather_queries: how the item->query direction sees the other ranks' queries. False
            (default): never move queries; in the same tiled pass as the query->item
            direction each rank computes, for every gathered item, the log-sum-exp over its
            OWN queries, and the ranks combine these partial column log-sum-exps with two
            all-reduces of N floats (max, then sum of exponentials; the backward is one
            more). True: all-gather the queries (N x D floats, with gradient) and run a
            second one-direction pass. Same value and gradients.
        mask_duplicate_items: apply the item half of the false-negative rule (both
            directions, hard negatives included); False ignores item ids.
        mask_duplicate_queries: apply the query half of the rule (both directions); False
            ignores query ids. The caller always passes the batch's ids: the loss alone
            decides what they mask.
        block_size: tile side of the kernel; default ``clicktower.kernels.DEFAULT_BLOCK_SIZE``.
        distill_weight: weight of the distillation term (0: off; see :class:`LossConfig`).
        distill_temperature: the teacher's softmax temperature.
        rank: this process's rank among ``world_size`` (the launcher's; the loss reads no
            global state in ``forward``).
        world_size: processes training together; every one must call the loss (collective).
        popularity: ``(items, queries)`` popularity sources (``CountTable`` or
            ``StreamingFrequency``) for the logQ correction, or None (off).
        memory: a ``CrossBatchMemory`` of past items as extra negatives, or None (off).
        memory_filter_margin: None, or m: memory entries scoring above ``(1 - m)`` x the
            query's positive are not its negatives (see :class:`LossConfig`).
        matryoshka_dims: prefixes trained as their own problems (see :class:`LossConfig`);
            the keys (and queries) are gathered once and sliced per prefix.
        matryoshka_weights: each prefix's weight (default 1).
    """

    def __init__(self, symmetric: bool = True, cross_device: bool = True, gather_queries: bool = False,
                 mask_duplicate_items: bool = True, mask_duplicate_queries: bool = True,
                 block_size: int | None = None, distill_weight: float = 0.0,
                 distill_temperature: float = 1.0, *, rank: int = 0, world_size: int = 1,
                 popularity: tuple | None = None, memory: CrossBatchMemory | None = None,
                 memory_filter_margin: float | None = None,
                 matryoshka_dims: list[int] | None = None, matryoshka_weights: list[float] | None = None) -> None:
        super().__init__()
        self.popularity, self.memory = popularity, memory
        if memory_filter_margin is not None and memory is None:
            raise ValueError("memory_filter_margin needs a memory")
        self.memory_filter_margin = memory_filter_margin
        parts = {} if popularity is None else {"popularity_items": popularity[0], "popularity_queries": popularity[1]}
        if memory is not None:
            parts["memory"] = memory
        # What checkpoints must hold for an exact resume (None: the loss is stateless).
        self.state = LossState(parts) if parts else None
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        check_matryoshka(matryoshka_dims, matryoshka_weights)
        self.matryoshka_dims = None if matryoshka_dims is None else [int(d) for d in matryoshka_dims]
        self.matryoshka_weights = (None if matryoshka_dims is None else
                                   [float(w) for w in (matryoshka_weights or [1.0] * len(matryoshka_dims))])
        self.symmetric = symmetric
        self.cross_device = cross_device
        self.gather_queries = gather_queries
        self.mask_duplicate_items = mask_duplicate_items
        self.mask_duplicate_queries = mask_duplicate_queries
        self.block_size = block_size
        self.distill_weight = float(distill_weight)
        self.distill_temperature = float(distill_temperature)
        # The ranks the keys are gathered over: this process alone without cross_device.
        self.rank, self.world_size = (rank, world_size) if cross_device else (0, 1)
        # The sum of w over the global batch of the last forward (a tensor or a float, read
        # only when a step goes wrong: reading it every step would cost a device sync).
        self.last_total_weight: torch.Tensor | float | None = None

    @classmethod
    def from_config(cls, cfg: LossConfig, *, rank: int = 0, world_size: int = 1,
                    popularity_counts: dict | None = None) -> "ContrastiveLoss":
        """The loss a ``LossConfig`` describes, for one rank of ``world_size`` processes.

        Args:
            cfg: loss config.
            rank: this process's rank (``accelerator.process_index``).
            world_size: processes training together (``accelerator.num_processes``):
                cross-device gathering applies above 1.
            popularity_counts: ``{"items": (ids, counts), "queries": (ids, counts)}`` int64
                tensors (the shards' recorded counts); needed by ``popularity_source: counts``.
        """
        return cls(cfg.symmetric, cfg.cross_device and world_size > 1, cfg.gather_queries, cfg.mask_duplicate_items,
                   cfg.mask_duplicate_queries, distill_weight=cfg.distill_weight,
                   distill_temperature=cfg.distill_temperature, rank=rank, world_size=world_size,
                   popularity=_popularity(cfg, popularity_counts),
                   memory=CrossBatchMemory(cfg.memory_size, cfg.memory_warmup_steps) if cfg.memory_size else None,
                   memory_filter_margin=cfg.memory_filter_margin,
                   matryoshka_dims=cfg.matryoshka_dims, matryoshka_weights=cfg.matryoshka_weights)

    def forward(self, query_emb: torch.Tensor, item_emb: torch.Tensor, logit_scale: torch.Tensor,
                labels: PairLabels | None = None, hard_negative_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the loss.

        Args:
            query_emb: [B, D] local query embeddings.
            item_emb: [B, D] embeddings of each query's clicked item.
            logit_scale: 0-dim inverse temperature.
            labels: the batch's labels (``PairLabels``; None: none). ``item_ids`` and
                ``query_ids`` [B] (-1 never matches) feed the duplicate masks;
                ``hard_negative_ids`` [H] mask a hard negative with the anchor's item id
                (default: never masked); ``weights`` [B] weigh the pairs (no gradient);
                ``exclude_ids`` [B, E] (needs ``item_ids``): keys with a listed id leave that
                pair's query->item denominator, and its query leaves the item->query
                denominator of each listed item, whatever ``mask_duplicate_items`` says
                (ranks may differ in E or lack it); ``teacher_scores`` [B, 1 + K] and
                ``hard_negative_owner`` [H] (non-decreasing) feed distillation.
            hard_negative_emb: [H, D] extra negatives for every query (query->item only).

        Returns:
            The scalar loss (fp32).
        """
        labels = PairLabels() if labels is None else labels
        shared = _Shared.of(self, query_emb, item_emb, labels, hard_negative_emb)
        self.last_total_weight = shared.total_weight
        if self.matryoshka_dims is None:
            loss = self._loss(query_emb, item_emb, hard_negative_emb, shared.keys, shared.queries, logit_scale,
                              labels, shared)
        else:
            loss = self._matryoshka(query_emb, item_emb, hard_negative_emb, logit_scale, labels, shared)
        if shared.levers is not None:
            shared.levers.commit()  # once per batch, after every prefix read the memory as it was
        return loss

    def _matryoshka(self, query_emb, item_emb, hard_negative_emb, logit_scale, labels: PairLabels,
                    shared: "_Shared") -> torch.Tensor:
        """The weighted sum of every listed prefix's loss (``matryoshka_dims``)."""
        full, loss = query_emb.shape[-1], 0.0
        for dim, weight in zip(self.matryoshka_dims, self.matryoshka_weights):
            if dim > full:
                raise ValueError(f"loss.matryoshka_dims: {dim} is larger than the embedding ({full})")
            # Slices of the SAME tensors (keys gathered once): autograd sums every prefix's
            # gradient into them before the one gather's backward.
            cut = [_prefix(x, dim, full) for x in (query_emb, item_emb, hard_negative_emb, shared.keys,
                                                   shared.queries)]
            loss = loss + weight * self._loss(*cut, logit_scale, labels, shared)
        return loss

    def _loss(self, query_emb, item_emb, hard_negative_emb, keys, queries, logit_scale, labels: PairLabels,
              shared: "_Shared") -> torch.Tensor:
        """The loss of one embedding size (the whole embedding, or one Matryoshka prefix)."""
        world, weights, targets = self.world_size, shared.weights, shared.targets
        key_ids, key_query_ids, exclude, levers = shared.key_ids, shared.key_query_ids, shared.exclude, shared.levers
        dup_ids = key_ids if self.mask_duplicate_items else None
        lse, partial = paired_logsumexp(query_emb, keys, logit_scale, targets=targets, key_ids=dup_ids,
                                        query_ids=shared.query_ids, key_query_ids=key_query_ids,
                                        num_columns=shared.columns, block_size=self.block_size,
                                        exclusions=None if exclude is None else (exclude, key_ids),
                                        key_bias=None if levers is None else levers.key_bias,
                                        query_bias=None if levers is None or not shared.columns else levers.query_bias,
                                        score_ceiling=self._memory_ceiling(query_emb, item_emb, levers))
        positive = positive_logits(query_emb, item_emb, logit_scale)
        if weights is not None:
            weights = weights.to(lse.dtype)
        # Sum over local pairs / (sum of w over the global batch / W): the one place
        # distributed gradients are scaled.
        loss = _weighted_sum(lse - positive, weights)
        if self.distill_weight and labels.teacher_scores is not None and hard_negative_emb is not None:
            kl = _distillation(query_emb, item_emb, hard_negative_emb, labels.hard_negative_owner,
                               labels.teacher_scores, logit_scale, self.distill_temperature)
            # Both directions' mean below halves the contrastive sum; the KL keeps its weight.
            loss = loss + (2.0 if self.symmetric else 1.0) * self.distill_weight * _weighted_sum(kl, weights)
        if not self.symmetric:
            return loss / shared.norm
        batch, offset, total = query_emb.shape[0], shared.offset, shared.total
        if shared.columns:
            item_lse = partial if world == 1 else _combine_partials(partial)[offset:offset + batch]
        else:
            # gather_queries: each local item against every rank's queries, a second pass.
            # Rows are now items: row a's ids are still pair a's (item via targets, query
            # local), the keys' ids those of the gathered pairs -- the same rule; an item
            # leaves the denominator of every gathered query whose list names it.
            pair_ids = None if key_ids is None else key_ids[:total]
            exclusions = None if exclude is None else (pair_ids[targets], shared.gathered_exclude)
            item_lse, _ = paired_logsumexp(
                item_emb, queries, logit_scale, targets=targets, key_ids=pair_ids if self.mask_duplicate_items else None,
                query_ids=shared.query_ids, key_query_ids=None if key_query_ids is None else key_query_ids[:total],
                block_size=self.block_size, exclusions=exclusions,
                key_bias=None if levers is None else levers.gathered_query_bias)
        return 0.5 * (loss + _weighted_sum(item_lse - positive, weights)) / shared.norm

    def _memory_ceiling(self, query_emb, item_emb, levers: "_Levers | None"):
        """``(ceiling [B], first memory key)`` of the memory filter for this embedding size, or
        None (off, or no entries in use this step)."""
        if self.memory_filter_margin is None or levers is None or levers.memory_start is None:
            return None
        # Each prefix its own ceiling: its positive's dot product on the prefix's embeddings, in
        # the kernel's compute dtype (fp32; fp64 for fp64 inputs), detached like every mask.
        cd = torch.float64 if query_emb.dtype == torch.float64 else torch.float32
        positive = (query_emb.detach().to(cd) * item_emb.detach().to(cd)).sum(-1)
        return (1.0 - self.memory_filter_margin) * positive, levers.memory_start


@dataclass
class _Shared:
    """The per-batch state every embedding size's loss shares (``_Shared.of``)."""

    sizes: list[int]
    offset: int                  # rows of the gathered keys before this rank's
    total: int                   # pairs of the global batch
    columns: int                 # > 0: item->query from the same pass (partial column LSEs)
    targets: torch.Tensor        # rows of the gathered keys holding this rank's positives
    keys: torch.Tensor           # every rank's items, then every rank's hard negatives
    key_ids: torch.Tensor | None
    key_query_ids: torch.Tensor | None
    query_ids: torch.Tensor | None
    exclude: torch.Tensor | None
    gathered_exclude: torch.Tensor | None
    queries: torch.Tensor | None  # every rank's queries (gather_queries only)
    weights: torch.Tensor | None
    norm: torch.Tensor | float
    total_weight: torch.Tensor | float | None
    levers: "_Levers | None" = None  # popularity correction and memory (None: off)

    @classmethod
    def of(cls, loss: "ContrastiveLoss", query_emb, item_emb, labels: PairLabels, hard_negative_emb) -> "_Shared":
        """What every prefix's loss shares: batch sizes, the normaliser, masks and ids, and
        the keys (and queries) gathered from every rank -- each collective runs once."""
        item_ids, query_ids, hard_negative_ids = labels.item_ids, labels.query_ids, labels.hard_negative_ids
        weights, exclude_ids = labels.weights, labels.exclude_ids
        if not loss.mask_duplicate_queries:
            query_ids = None
        world = loss.world_size
        batch, device = query_emb.shape[0], query_emb.device
        if weights is not None:
            weights = weights.detach().to(device)
        sizes, total_weight, width = _batch_stats(batch, weights, exclude_ids, world, device)
        exclude = _padded_exclusions(exclude_ids, batch, width, item_ids, device)
        if exclude is None and not loss.mask_duplicate_items:
            item_ids = hard_negative_ids = None  # no rank lists exclusions: ids unused
        offset, total = sum(sizes[:loss.rank]), sum(sizes)
        keys, key_ids, key_query_ids = _negatives(item_emb, item_ids, query_ids, hard_negative_emb,
                                                  hard_negative_ids, sizes, world)
        # The levers (memory entries as extra keys, logQ biases) once per batch, for every prefix.
        levers = _Levers(loss, labels, keys, key_ids, key_query_ids, sizes) if loss.state is not None else None
        if levers is not None:
            keys, key_ids, key_query_ids = levers.keys, levers.key_ids, levers.key_query_ids
        # The item->query direction from the same tiles (one pass): column log-sum-exps over
        # this rank's queries for every gathered item; in one process they are complete.
        columns = total if loss.symmetric and (world == 1 or not loss.gather_queries) else 0
        queries = gathered_exclude = None
        if loss.symmetric and not columns:
            queries = _gather(query_emb, sizes, world)
            gathered_exclude = None if exclude is None else _gather(exclude, sizes, world)
        if weights is None:
            weights_sum = None
        else:
            weights = weights.to(torch.float64 if query_emb.dtype == torch.float64 else torch.float32)
            weights_sum = weights.sum()
        if total_weight is None:
            total_weight = weights_sum
        return cls(sizes, offset, total, columns, offset + torch.arange(batch, device=device), keys, key_ids,
                   key_query_ids, query_ids, exclude, gathered_exclude, queries, weights,
                   _nonzero(total_weight) / world, total_weight, levers)


def check_matryoshka(dims, weights) -> None:
    """Validate ``matryoshka_dims`` / ``matryoshka_weights`` (see :class:`LossConfig`)."""
    if dims is None:
        if weights is not None:
            raise ValueError("loss.matryoshka_weights needs loss.matryoshka_dims")
        return
    if not dims or any(not isinstance(d, int) or d < 1 for d in dims) or len(set(dims)) != len(dims):
        raise ValueError(f"loss.matryoshka_dims must be distinct positive integers, got {list(dims)}")
    if weights is not None and (len(weights) != len(dims) or not all(0 <= w < math.inf for w in weights)):
        raise ValueError(f"loss.matryoshka_weights must be {len(dims)} finite numbers >= 0, got {list(weights)}")


def _prefix(x: torch.Tensor | None, dim: int, full: int) -> torch.Tensor | None:
    """The first ``dim`` columns, re-normalised (unchanged when ``dim`` is the whole size)."""
    if x is None or dim == full:
        return x
    return F.normalize(x[:, :dim], dim=-1)


def _nonzero(total: torch.Tensor | float) -> torch.Tensor | float:
    """The global total weight, or 1 where it is 0. Weights are >= 0 (a relevance grade of 0
    is legal), so a total of 0 means every weight of the global batch is 0: every term of the
    sum is then 0 x CE, and dividing by 1 instead of 0 makes the loss 0 with a zero gradient
    instead of 0 / 0 = NaN (which poisoned the update and every checkpoint after it). Every
    rank holds the same global total, so all ranks take this branch together."""
    if isinstance(total, torch.Tensor):
        return torch.where(total != 0, total, torch.ones_like(total))  # != : a NaN total stays NaN
    return total if total != 0 else 1.0


def _gather(x: torch.Tensor, sizes: list[int] | None, world: int) -> torch.Tensor:
    return x if world == 1 else gather_with_grad(x, sizes=sizes)


def _weighted_sum(per_pair: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return per_pair.sum() if weights is None else (weights * per_pair).sum()


def _batch_stats(batch: int, weights: torch.Tensor | None, exclude_ids: torch.Tensor | None, world: int,
                 device: torch.device):
    """Every rank's local batch size, the sum of w over the global batch (G without weights;
    None in one process with weights: the caller sums them in the loss's dtype) and the
    longest exclusion list of any rank (0: none anywhere).

    Across ranks all three come from ONE all_gather of (size, local sum of w, list width) per
    rank; a rank without weights counts 1 per pair (the loader's default weight) and a rank
    without exclusions has width 0, so ranks need not agree on what their batch carries (the
    width decides, on every rank alike, whether ids are gathered)."""
    width = 0 if exclude_ids is None else int(exclude_ids.shape[1])
    if world == 1:
        return [batch], (float(batch) if weights is None else None), width
    local = torch.full((1, 3), float(batch), dtype=torch.float64, device=device)
    if weights is not None:
        local[0, 1] = weights.sum()
    local[0, 2] = width
    rows = gather_with_grad(local, sizes=[1] * world).tolist()
    return [int(n) for n, _, _ in rows], sum(w for _, w, _ in rows), int(max(e for _, _, e in rows))


def _padded_exclusions(exclude_ids, batch: int, width: int, item_ids, device):
    """This rank's exclusion lists as [B, width] int64 padded with -1, or None (width 0)."""
    if width == 0:
        return None
    if item_ids is None:
        raise ValueError("exclude_ids needs item_ids (the item id of every pair)")
    out = torch.full((batch, width), -1, dtype=torch.int64, device=device)
    if exclude_ids is not None:
        if exclude_ids.dim() != 2 or exclude_ids.shape[0] != batch:
            raise ValueError(f"exclude_ids must be [{batch}, E], got {tuple(exclude_ids.shape)}")
        out[:, :exclude_ids.shape[1]] = exclude_ids.to(device=device, dtype=torch.int64)
    return out


def _distillation(query_emb, item_emb, hard_negative_emb, owner, teacher, logit_scale, temperature: float):
    """KL(teacher softmax || student softmax) per local pair, over its positive (column 0)
    and its own hard negatives (columns 1...) where the teacher has a score; 0 for a pair
    with fewer than two such candidates. fp32 (fp64 for fp64 inputs).

    Student logits: ``logit_scale * <query, candidate>``; teacher logits: ``score /
    temperature``."""
    if owner is None:
        raise ValueError("distillation needs hard_negative_owner (the pair of each hard negative)")
    batch, width = teacher.shape[0], teacher.shape[1]
    cd = torch.float64 if query_emb.dtype == torch.float64 else torch.float32
    q, scale = query_emb.to(cd), logit_scale.to(cd)
    owner = owner.to(device=q.device, dtype=torch.int64)
    counts = torch.bincount(owner, minlength=batch)
    position = 1 + torch.arange(owner.shape[0], device=q.device) - (torch.cumsum(counts, 0) - counts)[owner]
    keep = position < width  # negatives beyond the teacher's list have no score
    student = torch.full((batch, width), float("-inf"), dtype=cd, device=q.device)
    student[:, 0] = scale * (q * item_emb.to(cd)).sum(-1)
    negatives = scale * (q[owner[keep]] * hard_negative_emb[keep].to(cd)).sum(-1)
    student = student.index_put((owner[keep], position[keep]), negatives)
    teacher = teacher.to(device=q.device, dtype=cd)
    valid = torch.isfinite(teacher) & torch.isfinite(student)
    rows = valid.sum(1, keepdim=True) >= 2  # one candidate: nothing to match
    valid = valid & rows
    # Left-out entries at -inf (probability 0); a row without candidates all at 0 instead, so
    # that no softmax of only -inf (NaN, also in the backward) is ever taken.
    fill = torch.where(rows, float("-inf"), 0.0).to(cd).expand_as(student)
    log_p_teacher = torch.log_softmax(torch.where(valid, teacher / temperature, fill), 1)
    log_p_student = torch.log_softmax(torch.where(valid, student, fill), 1)
    zero = torch.zeros_like(student)
    p_teacher = torch.where(valid, log_p_teacher.exp(), zero)
    gap = torch.where(valid, log_p_teacher, zero) - torch.where(valid, log_p_student, zero)
    return (p_teacher * gap).sum(1)


def _negatives(item_emb, item_ids, query_ids, hard_negative_emb, hard_negative_ids, sizes, world):
    """Keys (every rank's items, then every rank's hard negatives), their item ids and the
    query ids of the pairs they come from (-1 for hard negatives: they have no query)."""
    keys = _gather(item_emb, sizes, world)
    key_ids = _gather(item_ids, sizes, world) if item_ids is not None else None
    key_query_ids = _gather(query_ids, sizes, world) if query_ids is not None else None
    if hard_negative_emb is None:
        return keys, key_ids, key_query_ids
    device = item_emb.device
    hn_sizes = gather_sizes(hard_negative_emb.shape[0], device) if world > 1 else None
    keys = torch.cat([keys, _gather(hard_negative_emb, hn_sizes, world)])
    n_hard = keys.shape[0] - sum(sizes)
    if key_ids is not None:
        if hard_negative_ids is None:
            hard_negative_ids = torch.full((hard_negative_emb.shape[0],), -1, dtype=key_ids.dtype, device=device)
        key_ids = torch.cat([key_ids, _gather(hard_negative_ids, hn_sizes, world)])
    if key_query_ids is not None:
        key_query_ids = torch.cat([key_query_ids, key_query_ids.new_full((n_hard,), -1)])
    return keys, key_ids, key_query_ids


def _combine_partials(partial: torch.Tensor) -> torch.Tensor:
    """Column log-sum-exps over every rank's queries from each rank's partial ones:
    log sum_r exp(partial_r) = M + log sum_r exp(partial_r - M), M the max over ranks (no
    gradient: the shift cancels). A rank whose queries are all masked for an item contributes
    exp(-inf) = 0; the positive's own rank always contributes. The sum's backward is an
    all-reduce too, so each rank's partials get every rank's use of them."""
    shift = all_reduce_max(partial)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    return shift + all_reduce_sum(torch.exp(partial - shift)).log()


def _popularity(cfg: LossConfig, counts: dict | None):
    """``(items, queries)`` popularity sources for ``cfg``, or None without the correction."""
    if cfg.popularity_correction == "none":
        return None
    if cfg.popularity_source == "streaming":
        return tuple(StreamingFrequency(cfg.popularity_buckets, cfg.popularity_alpha) for _ in range(2))
    if counts is None:
        raise ValueError("loss.popularity_source: counts needs the counts recorded by `clicktower shard` "
                         "(re-shard, or use popularity_source: streaming)")
    return CountTable(*counts["items"]), CountTable(*counts["queries"])


class _Levers:
    """One forward's view of the loss levers.

    Keys become [every rank's items (G), hard negatives (H), memory entries (M)]: the memory
    rows carry their item ids and query ids, so the item-id, query-id and exclusion masks
    apply to them as to any key, and they get no gradient (detached); ``memory_start`` is the
    first memory row (G + H), where the memory filter's score ceiling begins. With the logQ
    correction, ``key_bias`` is ``-log(K p(item))`` for the G items and the M memory rows (K =
    G + M: the expected count of the item among the corrected keys) and 0 for hard negatives
    (mined, not sampled by popularity); ``query_bias`` is ``-log(G p(query))`` for this
    rank's queries (the item->query columns), ``gathered_query_bias`` the same for every
    rank's queries (the ``gather_queries`` pass). ``commit`` pushes the step's items into the
    memory. The streaming estimator sees every rank's ids, so all ranks hold the same state.
    """

    def __init__(self, loss: ContrastiveLoss, labels: PairLabels, keys, key_ids, key_query_ids, sizes) -> None:
        world, total, device = loss.world_size, sum(sizes), keys.device
        local = torch.full((sizes[loss.rank],), -1, dtype=torch.int64, device=device)
        own_items = local if labels.item_ids is None else labels.item_ids.to(device)
        own_queries = local if labels.query_ids is None else labels.query_ids.to(device)
        self.item_ids, self.query_ids = _gather(own_items, sizes, world), _gather(own_queries, sizes, world)
        self.memory, self.new_items = loss.memory, keys[:total]
        entries = None if loss.memory is None else loss.memory.entries(keys)
        extra = 0 if entries is None else entries[0].shape[0]
        # Where the memory's rows start among the keys (None: no entries this step).
        self.memory_start = None if entries is None else keys.shape[0]
        if entries is not None:
            keys = torch.cat([keys, entries[0]])
            key_ids = None if key_ids is None else torch.cat([key_ids, entries[1]])
            key_query_ids = None if key_query_ids is None else torch.cat([key_query_ids, entries[2]])
        self.keys, self.key_ids, self.key_query_ids = keys, key_ids, key_query_ids
        self.key_bias = self.query_bias = self.gathered_query_bias = None
        if loss.popularity is not None:
            items, queries = loss.popularity
            items.observe(self.item_ids)
            queries.observe(self.query_ids)
            hard = keys.shape[0] - total - extra
            parts = [logq_bias(items, self.item_ids, total + extra), torch.zeros(hard, dtype=torch.float64,
                                                                                 device=device)]
            if entries is not None:
                parts.append(logq_bias(items, entries[1], total + extra))
            self.key_bias = torch.cat(parts)
            self.gathered_query_bias = logq_bias(queries, self.query_ids, total)
            offset = sum(sizes[:loss.rank])
            self.query_bias = self.gathered_query_bias[offset:offset + sizes[loss.rank]]

    def commit(self) -> None:
        """Push this step's items (every rank's, detached) into the memory."""
        if self.memory is not None:
            self.memory.push(self.new_items.detach(), self.item_ids, self.query_ids)
