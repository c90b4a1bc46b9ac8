"""Fused, tiled contrastive (InfoNCE / NT-Xent) losses in plain PyTorch.

The [B, N] similarity matrix is never materialised. Key (and query) blocks are streamed
through a fixed tile buffer; the forward pass keeps only per-row (and, for the symmetric
loss, per-column) running max / sum-of-exp vectors (an online log-sum-exp), and the
backward pass recomputes each tile once and feeds it straight into the two gradient
matmuls. No Triton, no compiled extension: the same code runs on CPU and CUDA.

Memory: besides the inputs, O((B + N) * D) for fp32 working copies / gradient
accumulators plus O(block_q * block_k) <= O(B * block_size) for the tile buffers.

FLOPs: 2*B*N*D in the forward (logits), 2*B*N*D (recompute) + 4*B*N*D (the grad_query
and grad_keys matmuls) in the backward: 8*B*N*D in all, for the one-direction and for
the symmetric loss alike (both directions share one tiled pass).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "fused_contrastive_loss",
    "fused_symmetric_contrastive_loss",
    "contrastive_logsumexp",
    "symmetric_logsumexp",
    "positive_logits",
]

# Keys per tile (and queries per tile). On a shared 2-core AVX-512 CPU, B=N=16384, D=256
# fwd+bwd took 19.5 s / 10.9 s / 7.9 s with 1024 / 2048 / 4096 blocks: every tile op is
# an OpenMP parallel region, and under CPU contention each region costs milliseconds, so
# few large tiles win. 4096x4096 fp32 is 64 MiB per tile buffer (two for the symmetric).
DEFAULT_BLOCK_SIZE = 4096

_NEG_INF = float("-inf")

# Fast paths of the symmetric kernel share one exp per tile between the two directions by
# rescaling with exp(+-spread); they are taken only while the spread of the values involved
# stays below this many nats (fp32 keeps e^-50 ~ 2e-22 as a normal number with full
# precision, and products of such factors stay far from overflow). Beyond it (logit scales
# near 100 on well-separated embeddings) the exact two-exp path runs instead.
_FAST_SPREAD = 50.0


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 inputs; fp64 stays fp64 (for gradcheck)."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _scale_tensor(logit_scale, like: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale), device=like.device)
    if logit_scale.dim() != 0:
        raise ValueError(f"logit_scale must be a 0-dim tensor, got shape {tuple(logit_scale.shape)}")
    return logit_scale


def _clamp_floor(q: torch.Tensor, k: torch.Tensor, s: torch.Tensor) -> Optional[float]:
    """Lower clamp for shifted logits before exp(), or None when no clamp is needed.

    exp() of arguments below ~-87 (fp32) yields denormals, which are ~30x slower on x86
    CPUs. Terms that small are below fp32 resolution of any row sum (each row holds its
    max, which contributes exp(0) = 1), so clamping them changes no result bit that
    matters (relative error <= N * 1.6e-38). GPUs handle denormals at full speed, and
    when |s| * max|q| * max|k| is small no shifted logit can get there, so skip it.
    """
    if q.device.type != "cpu":
        return None
    lo = -700.0 if q.dtype == torch.float64 else -87.0
    bound = 2.0 * abs(float(s)) * float(q.norm(dim=1).max()) * float(k.norm(dim=1).max())
    return lo if bound >= -lo - 1.0 else None


def _pair_mask(anchor_ids, other_ids, anchor_pos, other_start: int, dim: int):
    """Bool tile: True where an anchor's id equals another item's id, excluding the
    anchor's own positive and id -1.

    Anchors lie along ``dim`` of the tile (dim 0: rows are anchors, dim 1: columns are).
    ``anchor_ids`` have -1 already replaced by a value that matches nothing.
    ``anchor_pos`` is each anchor's positive index along the other dimension (global).
    """
    if dim == 0:
        eq = anchor_ids[:, None] == other_ids[None, :]
    else:
        eq = other_ids[:, None] == anchor_ids[None, :]
    n_other = other_ids.shape[0]
    local = anchor_pos - other_start
    inside = (local >= 0) & (local < n_other)
    idx = local.clamp(0, n_other - 1)
    # Clear the positive itself without a host sync (no nonzero()).
    if dim == 0:
        idx = idx[:, None]
        eq.scatter_(1, idx, eq.gather(1, idx) & ~inside[:, None])
    else:
        idx = idx[None, :]
        eq.scatter_(0, idx, eq.gather(0, idx) & ~inside[None, :])
    return eq


def _never_matching(anchor_ids: torch.Tensor, other_ids: torch.Tensor) -> torch.Tensor:
    """Replace -1 anchors by an id that no other item has (so -1 never matches)."""
    sentinel = other_ids.min() - 1 if other_ids.numel() else anchor_ids.new_tensor(-2)
    return torch.where(anchor_ids == -1, sentinel, anchor_ids)


def _online_update(t, m_run, s_run, dim: int, floor: Optional[float]):
    """Fold one tile of logits ``t`` into running (max, sum-exp) along ``dim`` (1: rows,
    0: columns). ``t`` is overwritten with exp(t - new_max). Updates m_run/s_run in place."""
    t_max = t.amax(dim)
    m_new = torch.maximum(m_run, t_max)
    # A fully masked row/column so far has max -inf: shift by 0 instead (avoids inf - inf).
    m_safe = torch.where(m_new == _NEG_INF, torch.zeros_like(m_new), m_new)
    t.sub_(m_safe[:, None] if dim == 1 else m_safe[None, :])
    if floor is not None:
        t.clamp_min_(floor)
    t.exp_()
    s_run.mul_(torch.exp(m_run - m_safe)).add_(t.sum(dim))
    m_run.copy_(m_new)


def _fold(m_run, s_run, t_max, t_sum):
    """Fold a tile's (max, sum of exp(t - max)) into running (max, sum-exp), in place."""
    m_new = torch.maximum(m_run, t_max)
    s_run.mul_(torch.exp(m_run - m_new)).add_(t_sum * torch.exp(t_max - m_new))
    m_run.copy_(m_new)


def _sym_tile_fast(x, m_r, s_r, m_c, s_c, floor) -> bool:
    """Row AND column (max, sum-exp) of one unmasked tile from a single exp pass.

    With E = exp(x - rowmax) the column sums follow from a matrix-vector product,
    sum_i exp(x_ij - M) = (E.T @ w)_j with w_i = exp(rowmax_i - M), M the tile max:
    one read pass instead of a second copy + exp over the tile. It is exact while no
    column's max lies more than _FAST_SPREAD below M (each column's largest term then stays
    >= exp(-_FAST_SPREAD), a normal fp32 number, and the clamp floor's error stays below
    ~1e-12 of every column sum). Otherwise returns False with ``x`` untouched, and the
    caller takes the exact two-exp path.
    """
    c_max = x.amax(0)
    r_max = x.amax(1)
    M = r_max.max()
    if float(c_max.min()) < float(M) - _FAST_SPREAD:  # host sync: a CPU no-op, rare on GPU
        return False
    x.sub_(r_max[:, None])
    if floor is not None:
        x.clamp_min_(floor)
    x.exp_()
    _fold(m_r, s_r, r_max, x.sum(1))
    _fold(m_c, s_c, M.expand_as(m_c), torch.mv(x.t(), torch.exp(r_max - M)))
    return True


def _tile(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    # A contiguous [rows, cols] view of the flat buffer (out= needs contiguity).
    return buf[: rows * cols].view(rows, cols)


def _any(mask: Optional[torch.Tensor]) -> bool:
    return mask is not None and bool(mask.any())


def _blocks(n: int, b: int):
    return [(i, min(i + b, n)) for i in range(0, n, b)]


def _no_autocast(t: torch.Tensor):
    # Under torch.autocast the tile matmuls would silently drop to bf16/fp16; the kernel
    # casts by itself and accumulates in fp32.
    return torch.autocast(device_type=t.device.type, enabled=False)


def _check_block(block_size) -> int:
    if block_size is None:
        return DEFAULT_BLOCK_SIZE
    block_size = int(block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return block_size


class _RowLSE(torch.autograd.Function):
    """Masked row log-sum-exp of s * q @ k.T, tiled; differentiable in q, k, s."""

    @staticmethod
    def forward(ctx, q, k, s, targets, key_ids, block):
        cd = _compute_dtype(q, k)
        B, N = q.shape[0], k.shape[0]
        with torch.no_grad(), _no_autocast(q):
            sc = s.to(cd)
            kf = k.to(cd)
            qs = q.to(cd) * sc
            floor = _clamp_floor(qs, kf, torch.ones((), dtype=cd))
            qid = None
            if key_ids is not None:
                qid = _never_matching(key_ids[targets], key_ids)
            bq, bk = min(block, B), min(block, N)
            buf = torch.empty(bq * bk, dtype=cd, device=q.device)
            m = torch.full((B,), _NEG_INF, dtype=cd, device=q.device)
            ssum = torch.zeros(B, dtype=cd, device=q.device)
            for r0, r1 in _blocks(B, bq):
                m_r, s_r = m[r0:r1], ssum[r0:r1]
                for c0, c1 in _blocks(N, bk):
                    x = torch.mm(qs[r0:r1], kf[c0:c1].t(), out=_tile(buf, r1 - r0, c1 - c0))
                    if qid is not None:
                        x.masked_fill_(_pair_mask(qid[r0:r1], key_ids[c0:c1], targets[r0:r1], c0, 0), _NEG_INF)
                    _online_update(x, m_r, s_r, 1, floor)
            lse = m + ssum.log()
        ctx.save_for_backward(q, k, s, targets, key_ids if key_ids is not None else None, lse)
        ctx.has_ids = key_ids is not None
        ctx.block = block
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward runs under no_grad
    def backward(ctx, g):
        q, k, s, targets, key_ids, lse = ctx.saved_tensors
        block = ctx.block
        need_q, need_k, need_s = ctx.needs_input_grad[:3]
        cd = lse.dtype
        B, N = q.shape[0], k.shape[0]
        with torch.no_grad(), _no_autocast(q):
            g = g.to(cd)
            sc = s.to(cd)
            qf = q.to(cd)
            kf = k.to(cd)
            qs = qf * sc
            # Row weights of G = diag(g) P are folded into the operands, not the tile.
            qs_g = qs * g[:, None] if need_k else None
            floor = _clamp_floor(qs, kf, torch.ones((), dtype=cd))
            qid = _never_matching(key_ids[targets], key_ids) if ctx.has_ids else None
            neg_lse = -lse
            bq, bk = min(block, B), min(block, N)
            buf = torch.empty(bq * bk, dtype=cd, device=q.device)
            A = torch.zeros_like(qf) if (need_q or need_s) else None
            dK = torch.zeros_like(kf) if need_k else None
            for r0, r1 in _blocks(B, bq):
                for c0, c1 in _blocks(N, bk):
                    kb = kf[c0:c1]
                    # P = exp(s q k^T - lse): the shift rides along in the GEMM's beta term.
                    x = torch.addmm(neg_lse[r0:r1, None], qs[r0:r1], kb.t(), out=_tile(buf, r1 - r0, c1 - c0))
                    if floor is not None:
                        x.clamp_min_(floor)
                    x.exp_()
                    if qid is not None:
                        x.masked_fill_(_pair_mask(qid[r0:r1], key_ids[c0:c1], targets[r0:r1], c0, 0), 0.0)
                    if A is not None:
                        A[r0:r1].addmm_(x, kb)
                    if dK is not None:
                        dK[c0:c1].addmm_(x.t(), qs_g[r0:r1])
            if A is not None:
                A.mul_(g[:, None])  # A = G @ k
            dq, dk, ds = _final_grads(A, dK, qf, sc, s, q, k, need_s, need_q)
        return dq, dk, ds, None, None, None


class _SymLSE(torch.autograd.Function):
    """Row and column masked log-sum-exps of s * q @ k.T from one tiled pass."""

    @staticmethod
    def forward(ctx, q, k, s, query_ids, key_ids, block):
        cd = _compute_dtype(q, k)
        B = q.shape[0]
        dev = q.device
        with torch.no_grad(), _no_autocast(q):
            kf = k.to(cd)
            qs = q.to(cd) * s.to(cd)
            floor = _clamp_floor(qs, kf, torch.ones((), dtype=cd))
            pos = torch.arange(B, device=dev)
            rid = _never_matching(key_ids, key_ids) if key_ids is not None else None
            cid = _never_matching(query_ids, query_ids) if query_ids is not None else None
            b = min(block, B)
            buf = torch.empty(b * b, dtype=cd, device=dev)
            cbuf = torch.empty(b * b, dtype=cd, device=dev)
            m_r = torch.full((B,), _NEG_INF, dtype=cd, device=dev)
            s_r = torch.zeros(B, dtype=cd, device=dev)
            m_c = torch.full((B,), _NEG_INF, dtype=cd, device=dev)
            s_c = torch.zeros(B, dtype=cd, device=dev)
            for r0, r1 in _blocks(B, b):
                for c0, c1 in _blocks(B, b):
                    nr, nc = r1 - r0, c1 - c0
                    x = torch.mm(qs[r0:r1], kf[c0:c1].t(), out=_tile(buf, nr, nc))
                    cmask = rmask = None
                    if cid is not None:
                        cmask = _pair_mask(cid[c0:c1], query_ids[r0:r1], pos[c0:c1], r0, 1)
                    if rid is not None:
                        rmask = _pair_mask(rid[r0:r1], key_ids[c0:c1], pos[r0:r1], c0, 0)
                    # Tiles without masked entries (all but those holding duplicate ids) take
                    # the one-exp path; the rest keep separate row and column passes.
                    if not _any(cmask) and not _any(rmask) and \
                            _sym_tile_fast(x, m_r[r0:r1], s_r[r0:r1], m_c[c0:c1], s_c[c0:c1], floor):
                        continue
                    y = _tile(cbuf, nr, nc).copy_(x)
                    if cmask is not None:
                        y.masked_fill_(cmask, _NEG_INF)
                    if rmask is not None:
                        x.masked_fill_(rmask, _NEG_INF)
                    _online_update(y, m_c[c0:c1], s_c[c0:c1], 0, floor)
                    _online_update(x, m_r[r0:r1], s_r[r0:r1], 1, floor)
            lse_r = m_r + s_r.log()
            lse_c = m_c + s_c.log()
        ctx.save_for_backward(q, k, s, query_ids, key_ids, lse_r, lse_c)
        ctx.block = block
        ctx.has_qids, ctx.has_kids = query_ids is not None, key_ids is not None
        return lse_r, lse_c

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward runs under no_grad
    def backward(ctx, g_r, g_c):
        q, k, s, query_ids, key_ids, lse_r, lse_c = ctx.saved_tensors
        need_q, need_k, need_s = ctx.needs_input_grad[:3]
        cd = lse_r.dtype
        B = q.shape[0]
        dev = q.device
        with torch.no_grad(), _no_autocast(q):
            g_r = torch.zeros_like(lse_r) if g_r is None else g_r.to(cd)
            g_c = torch.zeros_like(lse_c) if g_c is None else g_c.to(cd)
            sc = s.to(cd)
            qf = q.to(cd)
            kf = k.to(cd)
            qs = qf * sc
            floor = _clamp_floor(qs, kf, torch.ones((), dtype=cd))
            pos = torch.arange(B, device=dev)
            rid = _never_matching(key_ids, key_ids) if ctx.has_kids else None
            cid = _never_matching(query_ids, query_ids) if ctx.has_qids else None
            neg_lse_r = -lse_r
            b = min(ctx.block, B)
            buf = torch.empty(b * b, dtype=cd, device=dev)
            cbuf = torch.empty(b * b, dtype=cd, device=dev)
            A = torch.zeros_like(qf) if (need_q or need_s) else None
            dK = torch.zeros_like(kf) if need_k else None
            # One exp per tile: P_col = P_row * exp(lse_r_i - lse_c_j) = P_row * u_i * v_j, so
            # G = P_row * (g_r_i + u_i * v_j * g_c_j) -- exact while the lse values span less
            # than _FAST_SPREAD nats (u, v, u*v stay normal fp32 numbers); u, v in fp64 so the
            # rescaling adds no error beyond the fp32 rounding the direct exp has anyway.
            lo = torch.minimum(lse_r.min(), lse_c.min())
            hi = torch.maximum(lse_r.max(), lse_c.max())
            fast = float(hi - lo) <= _FAST_SPREAD
            if fast:
                mid = (0.5 * (hi + lo)).double()
                u = torch.exp(lse_r.double() - mid).to(cd)
                vg = (torch.exp(mid - lse_c.double()) * g_c.double()).to(cd)
            for r0, r1 in _blocks(B, b):
                for c0, c1 in _blocks(B, b):
                    nr, nc = r1 - r0, c1 - c0
                    kb = kf[c0:c1]
                    cmask = rmask = None
                    if cid is not None:
                        cmask = _pair_mask(cid[c0:c1], query_ids[r0:r1], pos[c0:c1], r0, 1)
                    if rid is not None:
                        rmask = _pair_mask(rid[r0:r1], key_ids[c0:c1], pos[r0:r1], c0, 0)
                    if fast and not _any(cmask) and not _any(rmask):
                        x = torch.addmm(neg_lse_r[r0:r1, None], qs[r0:r1], kb.t(), out=_tile(buf, nr, nc))
                        if floor is not None:
                            x.clamp_min_(floor)
                        x.exp_()
                        x.mul_(torch.addr(g_r[r0:r1, None], u[r0:r1], vg[c0:c1], out=_tile(cbuf, nr, nc)))
                        if A is not None:
                            A[r0:r1].addmm_(x, kb)
                        if dK is not None:
                            dK[c0:c1].addmm_(x.t(), qs[r0:r1])
                        continue
                    x = torch.mm(qs[r0:r1], kb.t(), out=_tile(buf, nr, nc))
                    y = torch.sub(x, lse_c[None, c0:c1], out=_tile(cbuf, nr, nc))
                    if floor is not None:
                        y.clamp_min_(floor)
                    y.exp_()
                    if cmask is not None:
                        y.masked_fill_(cmask, 0.0)
                    x.add_(neg_lse_r[r0:r1, None])
                    if floor is not None:
                        x.clamp_min_(floor)
                    x.exp_()
                    if rmask is not None:
                        x.masked_fill_(rmask, 0.0)
                    # G = diag(g_r) P_r + P_c diag(g_c)
                    x.mul_(g_r[r0:r1, None]).addcmul_(y, g_c[None, c0:c1])
                    if A is not None:
                        A[r0:r1].addmm_(x, kb)
                    if dK is not None:
                        dK[c0:c1].addmm_(x.t(), qs[r0:r1])
            dq, dk, ds = _final_grads(A, dK, qf, sc, s, q, k, need_s, need_q)
        return dq, dk, ds, None, None, None


def _final_grads(A, dK, qf, sc, s, q, k, need_s: bool, need_q: bool):
    """Gradients for query, keys and logit scale from the accumulated ``A = G @ k`` and
    ``dK = G.T @ (s * q)`` (fp32), cast back to the inputs' dtypes."""
    dq = ds = dk = None
    if A is not None:
        if need_s:
            ds = (qf * A).sum().to(s.dtype)  # d loss / d s = sum(G * q @ k.T) = sum(q * A)
        if need_q:
            dq = A.mul_(sc).to(q.dtype)
    if dK is not None:
        dk = dK.to(k.dtype)
    return dq, dk, ds


def _check_common(query, keys, name_b="query", name_n="keys"):
    if query.dim() != 2 or keys.dim() != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(f"{name_b} [B, D] and {name_n} [N, D] must share D, got "
                         f"{tuple(query.shape)} and {tuple(keys.shape)}")
    if not (query.is_floating_point() and keys.is_floating_point()):
        raise ValueError("query and keys must be floating point")
    if query.device != keys.device:
        raise ValueError("query and keys must be on the same device")


def _check_ids(ids, n, name):
    if ids is None:
        return None
    if ids.shape != (n,) or ids.dtype != torch.int64:
        raise ValueError(f"{name} must be an int64 tensor of shape [{n}], got {ids.dtype} {tuple(ids.shape)}")
    return ids


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def positive_logits(query, keys, logit_scale, targets=None) -> torch.Tensor:
    """Logits of each query's positive, s * <query[i], keys[targets[i]]>, in fp32 (fp64
    for fp64 inputs); differentiable through ordinary autograd. O(B * D) memory.

    Args:
        query: [B, D] queries.
        keys: [N, D] keys.
        logit_scale: 0-dim tensor.
        targets: [B] int64 column of each positive; default ``arange(B)``.
    """
    cd = _compute_dtype(query, keys)
    k_pos = keys if targets is None else keys[targets]
    s = _scale_tensor(logit_scale, query)
    return (query.to(cd) * k_pos[: query.shape[0]].to(cd)).sum(1) * s.to(cd)


def contrastive_logsumexp(query, keys, logit_scale, targets=None, key_ids=None, block_size=None):
    """Per-query log-sum-exp over keys of ``logit_scale * query @ keys.T`` (masked as in
    :func:`fused_contrastive_loss`), without materialising the [B, N] logits.

    Building block for the cross-device loss: ``loss_i = lse_i - positive_logits_i``.
    Differentiable in query, keys and logit_scale; extra memory O((B + N) * D +
    min(B, block_size) * block_size); 2*B*N*D FLOPs forward, 6*B*N*D backward.

    Args:
        query: [B, D] queries (fp32, bf16, fp16 or fp64).
        keys: [N, D] keys, same dtype family and device.
        logit_scale: 0-dim tensor multiplying the dot products.
        targets: [B] int64 positive column per query; only used for masking.
        key_ids: [N] int64 ids; keys sharing the id of a query's positive (other than the
            positive itself) are left out of that query's sum. -1 never matches.
        block_size: keys (and queries) per tile; default ``DEFAULT_BLOCK_SIZE``.

    Returns:
        [B] fp32 (fp64 for fp64 inputs) log-sum-exp per query.
    """
    _check_common(query, keys)
    B, N = query.shape[0], keys.shape[0]
    s = _scale_tensor(logit_scale, query)
    key_ids = _check_ids(key_ids, N, "key_ids")
    if targets is None:
        targets = torch.arange(B, device=query.device)
    elif targets.shape != (B,) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be an int64 tensor of shape [{B}]")
    return _RowLSE.apply(query, keys, s, targets, key_ids, _check_block(block_size))


def symmetric_logsumexp(query, keys, logit_scale, query_ids=None, key_ids=None, block_size=None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exps of ``logit_scale * query @ keys.T`` for paired rows
    (N == B), from one tiled pass; masks as in :func:`fused_symmetric_contrastive_loss`.

    Args:
        query: [B, D]; keys: [B, D]; logit_scale: 0-dim tensor.
        query_ids, key_ids: optional [B] int64 ids (-1 never matches).
        block_size: tile side (queries and keys per tile).

    Returns:
        (row_lse [B], col_lse [B]) in fp32 (fp64 for fp64 inputs).
    """
    _check_common(query, keys)
    B = query.shape[0]
    if keys.shape[0] != B:
        raise ValueError(f"symmetric loss needs paired rows, got B={B}, N={keys.shape[0]}")
    s = _scale_tensor(logit_scale, query)
    query_ids = _check_ids(query_ids, B, "query_ids")
    key_ids = _check_ids(key_ids, B, "key_ids")
    return _SymLSE.apply(query, keys, s, query_ids, key_ids, _check_block(block_size))


def fused_contrastive_loss(query, keys, logit_scale, targets=None, key_ids=None, block_size=None,
                           reduction: str = "mean"):
    """InfoNCE loss ``F.cross_entropy(logit_scale * query @ keys.T, targets)`` (with masked
    entries set to -inf) without materialising the [B, N] logits.

    Keys are streamed in tiles with an online log-sum-exp; the backward recomputes each
    tile once. Same value and gradients (query, keys, logit_scale) as the naive version.
    Extra memory O((B + N) * D + B * block_size) -- precisely, fp32 copies/accumulators
    of size (B + N) * D plus one min(B, block_size) x block_size tile. FLOPs: 8 * B * N * D
    (2 forward, 2 recompute + 4 gradient matmuls backward).

    Args:
        query: [B, D] queries; fp32, bf16, fp16 (accumulated in fp32) or fp64.
        keys: [N, D] keys, N >= B.
        logit_scale: 0-dim tensor multiplying ``query @ keys.T``; receives a gradient.
        targets: [B] int64 column of each query's positive key; default ``arange(B)``.
        key_ids: [N] int64 optional; keys whose id equals ``key_ids[targets[i]]``, other
            than the positive itself, are left out of query i's denominator. -1 never
            matches.
        block_size: keys (and queries) per tile; default ``DEFAULT_BLOCK_SIZE`` (4096).
        reduction: "mean" (default) or "sum" over queries.

    Returns:
        0-dim fp32 loss (fp64 for fp64 inputs).
    """
    lse = contrastive_logsumexp(query, keys, logit_scale, targets, key_ids, block_size)
    pos = positive_logits(query, keys, logit_scale, targets)
    return _reduce(lse - pos, reduction)


def fused_symmetric_contrastive_loss(query, keys, logit_scale, query_ids=None, key_ids=None,
                                     block_size=None, reduction: str = "mean"):
    """Symmetric (CLIP-style) loss for paired rows (N == B): the mean of the query->key
    and key->query InfoNCE losses, from ONE tiled pass.

    The forward keeps running row and column (max, sum-exp) vectors across [block, block]
    tiles; the backward recomputes each tile once and applies the combined gradient
    ``diag(g_r) P_row + P_col diag(g_c)`` in one pair of matmuls: 8 * B * N * D FLOPs in
    all, extra memory O(B * D + block_size^2). Both directions share one exp per tile
    (column statistics by a matrix-vector product, ``P_col = P_row * exp(lse_r - lse_c)``)
    wherever the values span less than ``_FAST_SPREAD`` nats; tiles holding duplicate ids or
    wider spreads take an exact path with one exp per direction.

    Args:
        query: [B, D]; keys: [B, D] (row i is positive with key i).
        logit_scale: 0-dim tensor; receives a gradient.
        query_ids: [B] int64 optional; key->query direction leaves out queries whose id
            equals ``query_ids[j]``, other than j itself. -1 never matches.
        key_ids: [B] int64 optional; query->key direction leaves out keys whose id equals
            ``key_ids[i]``, other than i itself. -1 never matches.
        block_size: tile side; default ``DEFAULT_BLOCK_SIZE``.
        reduction: "mean" (default): 0.5 * (mean_i l_qk + mean_j l_kq); "sum":
            0.5 * (sum_i l_qk + sum_j l_kq), i.e. B times the mean.

    Returns:
        0-dim fp32 loss (fp64 for fp64 inputs).
    """
    lse_r, lse_c = symmetric_logsumexp(query, keys, logit_scale, query_ids, key_ids, block_size)
    pos = positive_logits(query, keys, logit_scale)
    return 0.5 * (_reduce(lse_r - pos, reduction) + _reduce(lse_c - pos, reduction))
