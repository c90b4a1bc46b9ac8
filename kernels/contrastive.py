"""Fused, tiled contrastive (InfoNCE / NT-Xent) losses in plain PyTorch.

The [B, N] similarity matrix is never materialised: query and key blocks stream through a
fixed tile buffer, the forward keeps running row and column log-sum-exps, and the backward
recomputes each tile once and feeds it straight into the two gradient matmuls. No Triton, no
compiled extension: the same code runs on CPU and CUDA.

One kernel (``_PairLSE``) serves every loss: the row log-sum-exps over all N keys and, from
the same tiles, the column log-sum-exps over the B queries for the first C keys (C = 0: one
direction; C = B: symmetric; across devices, partial columns combined by the caller).
Memory O((B + N) * D) plus two tiles; 8*B*N*D FLOPs; one host read per pass on a GPU.
Paths, masks, precision and tests: docs/fused-loss.md, "How the kernel works".
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .pair_masks import PairMask, ScoreCeiling, fill_, merge

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "fused_contrastive_loss",
    "fused_symmetric_contrastive_loss",
    "contrastive_logsumexp",
    "symmetric_logsumexp",
    "paired_logsumexp",
    "positive_logits",
]

# Keys per tile (and queries per tile). On a shared 2-core AVX-512 CPU, B=N=16384, D=256
# fwd+bwd took 19.5 s / 10.9 s / 7.9 s with 1024 / 2048 / 4096 blocks: every tile op is
# an OpenMP parallel region, and under CPU contention each region costs milliseconds, so
# few large tiles win. 4096x4096 fp32 is 64 MiB per tile buffer (two for the symmetric).
DEFAULT_BLOCK_SIZE = 4096

_NEG_INF = float("-inf")

# The symmetric fast paths share one exp per tile between the two directions by rescaling
# with exp(+-spread); they are taken only while the spread of the values involved stays
# below this many nats (fp32 keeps e^-50 ~ 2e-22 as a normal number with full precision,
# and products of such factors stay far from overflow). Beyond it (logit scales near 100 on
# well-separated embeddings) the exact two-exp path runs instead.
_FAST_SPREAD = 50.0

# When no two logits of a call can differ by more than this many nats (2 |s| max|q| max|k|,
# e.g. unit-norm embeddings at logit scale <= 40), the forward shifts every row and column by
# the same constant, the largest possible logit: every exp lies in [e^-80, 1], normal fp32
# numbers at full precision, so no running maxima and no rescaling are needed.
_FLAT_SPAN = 80.0

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_NATIVE_LOW_MM: dict = {}


def _on_host(device: torch.device) -> bool:
    """Reading a tensor value is free here (CPU), so the kernel may branch per tile on data
    (skip clean tiles, pick the one-exp path). On a GPU every such read stalls the host until
    the queue drains, so decisions are taken once per call there."""
    return device.type == "cpu"


def _native_low_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` operands here
    (CUDA builds: a bf16/fp16 GEMM with fp32 output). Probed once per device type and dtype."""
    key = (device.type, dtype)
    if key not in _NATIVE_LOW_MM:
        try:
            one = torch.ones(1, 1, dtype=dtype, device=device)
            _NATIVE_LOW_MM[key] = torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, NotImplementedError, TypeError):
            _NATIVE_LOW_MM[key] = False
    return _NATIVE_LOW_MM[key]


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


class _Operands:
    """One call's matmul operands: ``s * q`` and ``k`` in the operand dtype, with fp32 (fp64
    for fp64 inputs) results.

    bf16/fp16 inputs keep bf16/fp16 operands: the tile matmuls run as low-precision GEMMs with
    fp32 accumulation and output (``out_dtype``; where the build has none, as on the CPU, the
    operands are widened per tile, which gives the same products exactly), and the softmax
    statistics stay fp32. ``s * q`` is rounded to the operand dtype once.
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, s: torch.Tensor, keep_query: bool = False) -> None:
        self.cd = _compute_dtype(q, k)
        low = q.dtype == k.dtype and q.dtype in _LOW_PRECISION
        self.dtype = q.dtype if low else self.cd
        self.native = low and _native_low_mm(q.device, q.dtype)
        self.scale = s.to(self.cd)
        qf = q.to(self.cd)
        self.qs = (qf * self.scale).to(self.dtype)
        self.k = k.to(self.dtype)
        self.qf = qf if keep_query else None
        self.host = _on_host(q.device)

    def spread_bound(self, extra: Optional[torch.Tensor] = None) -> float:
        """2 * max|s q_i| * max|k_j| (+ ``extra``, the span of the call's logit biases): no
        two logits of the call differ by more (one host read)."""
        if not (self.qs.numel() and self.k.numel()):
            return 0.0
        nq = torch.linalg.vector_norm(self.qs, dim=1, dtype=self.cd).max()
        nk = torch.linalg.vector_norm(self.k, dim=1, dtype=self.cd).max()
        bound = 2.0 * nq * nk
        return float(bound if extra is None else bound + extra.to(self.cd))

    def floor(self, bound: float) -> Optional[float]:
        """Lower clamp for shifted logits before exp(), or None when no clamp is needed.

        exp() of arguments below ~-87 (fp32) yields denormals, which are ~30x slower on x86
        CPUs. Terms that small are below fp32 resolution of any row sum (each row holds its
        max, which contributes exp(0) = 1), so clamping them changes no result bit that
        matters (relative error <= N * 1.6e-38). GPUs handle denormals at full speed, and
        when the logits span less than the clamp no shifted logit can get there.
        """
        if not self.host:
            return None
        lo = -700.0 if self.cd == torch.float64 else -87.0
        return lo if bound >= -lo - 1.0 else None

    def mm(self, a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
        """``a @ b`` in the compute dtype (into ``out`` where the operands allow)."""
        if a.dtype == self.cd:
            return torch.mm(a, b, out=out)
        if self.native:
            return torch.mm(a, b, out_dtype=self.cd)
        return torch.mm(a.to(self.cd), b.to(self.cd), out=out)

    def logits(self, r0: int, r1: int, c0: int, c1: int, out: torch.Tensor,
               shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tile ``s q[r0:r1] @ k[c0:c1].T``, plus ``shift`` (broadcast: [rows, 1] or [1, 1])."""
        a, b = self.qs[r0:r1], self.k[c0:c1].t()
        if shift is not None and self.dtype == self.cd:
            # The shift rides along in the GEMM's beta term.
            return torch.addmm(shift, a, b, out=out)
        x = self.mm(a, b, out)
        return x if shift is None else x.add_(shift)

    def accumulate(self, A, dK, g: torch.Tensor, r0: int, r1: int, c0: int, c1: int,
                   q_rows: torch.Tensor) -> None:
        """``A[r0:r1] += g @ k[c0:c1]`` and ``dK[c0:c1] += g.T @ q_rows[r0:r1]``."""
        if self.dtype != self.cd:
            g = g.to(self.dtype)  # low-precision operands for the gradient GEMMs too
        if A is not None:
            _add_product(A[r0:r1], g, self.k[c0:c1], self)
        if dK is not None:
            _add_product(dK[c0:c1], g.t(), q_rows[r0:r1], self)


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ops: _Operands) -> None:
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(ops.mm(a, b, None))


def _tile(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    # A contiguous [rows, cols] view of the flat buffer (out= needs contiguity).
    return buf[: rows * cols].view(rows, cols)


def _blocks(n: int, b: int):
    return [(i, min(i + b, n)) for i in range(0, n, b)]


def _no_autocast(t: torch.Tensor):
    # Under torch.autocast the tile matmuls would silently drop to bf16/fp16; the kernel
    # picks its operand dtype by itself and accumulates in fp32.
    return torch.autocast(device_type=t.device.type, enabled=False)


def _check_block(block_size) -> int:
    if block_size is None:
        return DEFAULT_BLOCK_SIZE
    block_size = int(block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return block_size


def _exp_(x: torch.Tensor, floor: Optional[float]) -> torch.Tensor:
    if floor is not None:
        x.clamp_min_(floor)
    return x.exp_()


def _fold(m_run, s_run, t_max, t_sum):
    """Fold a tile's (max, sum of exp(t - max)) into running (max, sum-exp), in place. A max
    of -inf (nothing unmasked yet, or in this tile) contributes nothing."""
    m_new = torch.maximum(m_run, t_max)
    m_safe = torch.where(m_new == _NEG_INF, torch.zeros_like(m_new), m_new)
    s_run.mul_(torch.exp(m_run - m_safe)).add_(t_sum * torch.exp(t_max - m_safe))
    m_run.copy_(m_new)


def _online_update(t, m_run, s_run, dim: int, floor: Optional[float]):
    """Fold one tile of logits ``t`` into running (max, sum-exp) along ``dim`` (1: rows,
    0: columns). ``t`` is overwritten with exp(t - tile max)."""
    t_max = t.amax(dim)
    # A fully masked row/column has max -inf: shift by 0 instead (avoids inf - inf).
    safe = torch.where(t_max == _NEG_INF, torch.zeros_like(t_max), t_max)
    t.sub_(safe[:, None] if dim == 1 else safe[None, :])
    _fold(m_run, s_run, t_max, _exp_(t, floor).sum(dim))


def _sym_tile_fast(x, m_r, s_r, m_c, s_c, floor, check=True, scratch=None, flat=False) -> bool:
    """Row AND column (max, sum-exp) of one tile (masked entries already -inf) from a
    single exp pass.

    ``flat``: ``x`` already holds the logits minus the call's common shift (which ``m_r`` and
    ``m_c`` hold): one exp, then row sums and column sums. Otherwise, with E = exp(x - rowmax)
    the column sums follow from a matrix-vector product, sum_i exp(x_ij - M) = (E.T @ w)_j
    with w_i = exp(rowmax_i - M), M the tile max: one read pass instead of a second copy +
    exp over the tile. It is exact while no column's max lies more than _FAST_SPREAD below M
    (each column's largest term then stays >= exp(-_FAST_SPREAD), a normal fp32 number, and
    the clamp floor's error stays below ~1e-12 of every column sum). ``check`` (CPU): test
    that, and return False with ``x`` untouched when it fails, so the caller takes the exact
    two-exp path. ``scratch`` (GPU): also sum exp(x - colmax) per column in ``scratch`` and
    pick per column on the device, without reading anything back.
    """
    if flat:
        _exp_(x, floor)
        s_r.add_(x.sum(1))
        s_c.add_(torch.mv(x.t(), torch.ones(x.shape[0], dtype=x.dtype, device=x.device)))
        return True
    c_max = x.amax(0)
    r_max = x.amax(1)
    top = r_max.max()
    empty = c_max == _NEG_INF  # every entry of the column masked in this tile
    ok = (c_max >= top - _FAST_SPREAD) | empty
    if check and not bool(ok.all()):  # host read: only with check, i.e. on the CPU
        return False
    exact = None
    if scratch is not None:
        shift = torch.where(empty, torch.zeros_like(c_max), c_max)
        exact = _exp_(torch.sub(x, shift[None, :], out=scratch), None).sum(0)
    _exp_(x.sub_(torch.where(r_max == _NEG_INF, torch.zeros_like(r_max), r_max)[:, None]), floor)
    _fold(m_r, s_r, r_max, x.sum(1))
    top_safe = torch.where(top == _NEG_INF, torch.zeros_like(top), top)
    col_sum = torch.mv(x.t(), torch.exp(r_max - top_safe))
    col_max = torch.where(empty, c_max, top.expand_as(c_max))
    if exact is not None:
        col_sum, col_max = torch.where(ok, col_sum, exact), torch.where(ok, col_max, c_max)
    _fold(m_c, s_c, col_max, col_sum)
    return True


def _add_stats(t, m_run, s_run, dim: int, floor: Optional[float], flat: bool) -> None:
    """Fold a tile into running (max, sum-exp) along ``dim``; ``flat``: ``t`` is already
    shifted by the call's common shift, so its exps just add up."""
    if flat:
        s_run.add_(_exp_(t, floor).sum(dim))
    else:
        _online_update(t, m_run, s_run, dim, floor)


class _Bias:
    """Per-key and per-query additive logit biases, positives left alone (logQ correction).

    Row i's log-sum-exp runs over ``x_ij + key[j]`` and column j's over ``x_ij + query[i]``,
    except at row i's positive (i, targets[i]), which keeps ``x_it`` in both directions:
    ``lse_i = log(exp(x_it) + sum_{j != t, unmasked} exp(x_ij + key_j))``. Applied per tile by
    adding the bias to every entry and writing the positive entries' unbiased values back
    (gathered before the add: bit-exact, no cancellation). A bias is a constant, so the
    gradient of every entry keeps the form P_ij * g: the backward recomputes the same biased
    tiles. The one-exp paths assume both directions see the same tile, so biased calls take
    the exact two-exp paths; the flat common shift is off (biases widen the span).

    Args:
        key: [N] bias of each key in the row direction, or None.
        query: [B] bias of each query in the column direction, or None.
        targets: [B] int64 positive column per row.
    """

    def __init__(self, key: Optional[torch.Tensor], query: Optional[torch.Tensor], targets: torch.Tensor) -> None:
        self.key, self.query, self.targets = key, query, targets

    def span(self) -> torch.Tensor:
        """How much the biases can widen the spread of a call's logits (a tensor: no host read);
        0 is included (positives are unbiased)."""
        total = torch.zeros((), dtype=torch.float64, device=self.targets.device)
        for b in (self.key, self.query):
            if b is not None and b.numel():
                total = total + (b.max().clamp_min(0) - b.min().clamp_max(0)).double()
        return total

    def rows_(self, x: torch.Tensor, r0: int, c0: int) -> torch.Tensor:
        """Add the key bias to a tile for the row direction, in place."""
        if self.key is None:
            return x
        return _bias_but_positives_(x, self.key[None, c0:c0 + x.shape[1]], self.targets[r0:r0 + x.shape[0]], c0)

    def columns_(self, x: torch.Tensor, r0: int, c0: int) -> torch.Tensor:
        """Add the query bias to a tile for the column direction, in place."""
        if self.query is None:
            return x
        return _bias_but_positives_(x, self.query[r0:r0 + x.shape[0], None], self.targets[r0:r0 + x.shape[0]], c0)


def _bias_but_positives_(x: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor, c0: int) -> torch.Tensor:
    """``x += bias`` (broadcast) except at each row's positive column, without a host read."""
    n_cols = x.shape[1]
    if not n_cols:
        return x
    local = targets - c0
    inside = ((local >= 0) & (local < n_cols))[:, None]
    idx = local.clamp(0, n_cols - 1)[:, None]
    kept = x.gather(1, idx)
    x.add_(bias.to(x.dtype))
    return x.scatter_(1, idx, torch.where(inside, kept, x.gather(1, idx)))


class _Plan:
    """Tiling and masks of one kernel call.

    Rows in blocks of min(block, B); the first ``columns`` keys (those that get a column
    log-sum-exp) and the rest in separate blocks of min(block, N), so that every tile is
    either a two-direction tile or a row-only one.

    Args:
        batch, n_keys, columns: B, N and C.
        block: tile side.
        device: where the ids live.
        targets: [B] positive column per row.
        row_kinds: id kinds of the row mask (see :mod:`pair_masks`); empty: no mask.
        col_kinds: None: the column direction uses the row mask (one rule for both
            directions); else its own kinds (the per-direction masks of
            :func:`symmetric_logsumexp`).
        bias: the call's logit biases (:class:`_Bias`), or None.
        ceiling: a :class:`ScoreCeiling` for row-only keys (beyond ``columns``), or None.
    """

    def __init__(self, batch: int, n_keys: int, columns: int, block: int, device: torch.device,
                 targets: torch.Tensor, row_kinds: List, col_kinds: Optional[List] = None,
                 bias: Optional["_Bias"] = None, ceiling: Optional[ScoreCeiling] = None) -> None:
        bq, bk = max(1, min(block, batch)), max(1, min(block, n_keys))
        self.batch, self.columns, self.tile_elems = batch, columns, bq * bk
        self.bias, self.ceiling = bias, ceiling
        self.rows = _blocks(batch, bq)
        self.cols = _blocks(columns, bk) + [(a + columns, b + columns) for a, b in _blocks(n_keys - columns, bk)]
        host = _on_host(device)
        self.row_mask = PairMask(row_kinds, targets, self.rows, self.cols, host) if row_kinds else None
        self.shared = col_kinds is None
        if self.shared:
            self.col_mask = self.row_mask
        else:
            self.col_mask = PairMask(col_kinds, targets, self.rows, self.cols, host) if col_kinds else None

    def masks(self, ri: int, ci: int):
        """(row mask, column mask) of a tile for :func:`fill_`."""
        rm = self.row_mask.tile(ri, ci) if self.row_mask is not None else None
        if self.ceiling is not None:
            # Row-only keys (the caller checks first >= columns): the column mask never needs it.
            rm = merge(self.ceiling.tile(*self.rows[ri], *self.cols[ci]), rm)
        if self.shared:
            return rm, rm
        return rm, (self.col_mask.tile(ri, ci) if self.col_mask is not None else None)

    def one_mask(self, rm, cm) -> bool:
        """The tile's two directions share their mask (the one-exp paths apply)."""
        return self.shared or (rm is None and cm is None)


def _forward_pass(ops: _Operands, plan: _Plan) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Row [B] and column [C] log-sum-exps of one call, and the call's logit spread bound."""
    B, C, cd, dev = plan.batch, plan.columns, ops.cd, ops.qs.device
    m_r = torch.full((B,), _NEG_INF, dtype=cd, device=dev)
    s_r = torch.zeros(B, dtype=cd, device=dev)
    m_c = torch.full((C,), _NEG_INF, dtype=cd, device=dev)
    s_c = torch.zeros(C, dtype=cd, device=dev)
    bias = plan.bias
    bound = ops.spread_bound(None if bias is None else bias.span())  # the one host read of the forward
    floor = ops.floor(bound)
    flat = bound <= _FLAT_SPAN and bias is None
    shift = None
    if flat:  # one shift, the largest possible logit, for every row and column
        m_r.fill_(0.5 * bound)
        m_c.fill_(0.5 * bound)
        shift = torch.full((1, 1), -0.5 * bound, dtype=cd, device=dev)
    buf = torch.empty(plan.tile_elems, dtype=cd, device=dev)
    cbuf = torch.empty(plan.tile_elems if C else 0, dtype=cd, device=dev)
    for ri, (r0, r1) in enumerate(plan.rows):
        for ci, (c0, c1) in enumerate(plan.cols):
            nr, nc = r1 - r0, c1 - c0
            x = ops.logits(r0, r1, c0, c1, _tile(buf, nr, nc), shift)
            rm, cm = plan.masks(ri, ci)
            if c0 >= C:  # hard negatives: row direction only
                x = fill_(x if bias is None else bias.rows_(x, r0, c0), rm, _NEG_INF)
                _add_stats(x, m_r[r0:r1], s_r[r0:r1], 1, floor, flat)
                continue
            if plan.one_mask(rm, cm) and bias is None:
                fill_(x, rm, _NEG_INF)
                # Non-flat calls: the CPU checks each tile, a GPU picks per column on the device.
                device_side = None if (ops.host or flat) else _tile(cbuf, nr, nc)
                if _sym_tile_fast(x, m_r[r0:r1], s_r[r0:r1], m_c[c0:c1], s_c[c0:c1], floor,
                                  ops.host and not flat, device_side, flat):
                    continue
                y = _tile(cbuf, nr, nc).copy_(x)
            else:
                y = _tile(cbuf, nr, nc).copy_(x)
                if bias is not None:
                    bias.columns_(y, r0, c0)
                    bias.rows_(x, r0, c0)
                fill_(y, cm, _NEG_INF)
                fill_(x, rm, _NEG_INF)
            _add_stats(y, m_c[c0:c1], s_c[c0:c1], 0, floor, flat)
            _add_stats(x, m_r[r0:r1], s_r[r0:r1], 1, floor, flat)
    return m_r + s_r.log(), m_c + s_c.log(), bound


def _rescaling(lse_r: torch.Tensor, lse_c: torch.Tensor, g_c: torch.Tensor):
    """``(u, vg, log u)`` with ``P_col * g_c = P_row * u_i * vg_j`` (one exp serves both
    directions), or None when the log-sum-exps span more than _FAST_SPREAD nats. One host
    read.

    ``P_col = P_row * exp(lse_r_i - lse_c_j)`` is split around the midpoint of the range so
    that u, v and u*v stay normal fp32 numbers; computed in fp64 so the rescaling adds no
    error beyond the fp32 rounding the direct exp has anyway. Columns without any unmasked
    entry (lse -inf, possible for partial column sums across devices) get vg = 0.
    """
    if not (lse_r.numel() and lse_c.numel()):
        return None
    finite = torch.isfinite(lse_c)
    lo = torch.minimum(lse_r.min(), torch.where(finite, lse_c, torch.full_like(lse_c, float("inf"))).min())
    hi = torch.maximum(lse_r.max(), torch.where(finite, lse_c, torch.full_like(lse_c, _NEG_INF)).max())
    if not float(hi - lo) <= _FAST_SPREAD:
        return None
    mid = (0.5 * (hi + lo)).double()
    log_u = lse_r.double() - mid
    vg = torch.where(finite, torch.exp(mid - lse_c.double()) * g_c.double(), torch.zeros_like(g_c, dtype=torch.float64))
    return torch.exp(log_u).to(lse_r.dtype), vg.to(lse_r.dtype), log_u.to(lse_r.dtype)


def _backward_pass(ops: _Operands, plan: _Plan, lse_r, lse_c, g_r, g_c, bound: float, need_a: bool,
                   need_k: bool):
    """``A = G @ k`` and ``dK = G.T @ (s q)`` for ``G = diag(g_r) P_row + P_col diag(g_c)``.

    A row factor of G rides in the operands instead of the tiles (``A`` scaled at the end,
    ``s q`` scaled once): ``g`` for one direction; for both, ``u`` of the one-exp rescaling,
    leaving ``P_row * (g_r_i / u_i + vg_j)`` per tile, one broadcast add and one multiply.
    """
    C, cd, dev, bias = plan.columns, ops.cd, ops.qs.device, plan.bias
    floor = ops.floor(bound)
    # The one host read of the backward; biased calls take the exact paths (see _Bias).
    scaled = _rescaling(lse_r, lse_c, g_c) if C and bias is None else None
    row_scale = g_r if not C else (scaled[0] if scaled is not None else None)
    row_g = g_r if row_scale is None or not C else g_r / row_scale  # what a tile's rows keep of g_r
    q_rows = ops.qs if row_scale is None else (ops.qs.to(cd) * row_scale[:, None]).to(ops.dtype)
    A = torch.zeros(ops.qs.shape, dtype=cd, device=dev) if need_a else None
    dK = torch.zeros(ops.k.shape, dtype=cd, device=dev) if need_k else None
    neg_lse_r = -lse_r
    # A column with no unmasked entry here has lse -inf; +inf makes its P_col exp(-inf) = 0.
    lse_c_safe = torch.where(lse_c == _NEG_INF, torch.full_like(lse_c, float("inf")), lse_c)
    buf = torch.empty(plan.tile_elems, dtype=cd, device=dev)
    cbuf = torch.empty(plan.tile_elems if C else 0, dtype=cd, device=dev)
    for ri, (r0, r1) in enumerate(plan.rows):
        for ci, (c0, c1) in enumerate(plan.cols):
            nr, nc = r1 - r0, c1 - c0
            rm, cm = plan.masks(ri, ci)
            if c0 >= C or (scaled is not None and plan.one_mask(rm, cm)):
                x = ops.logits(r0, r1, c0, c1, _tile(buf, nr, nc), neg_lse_r[r0:r1, None])
                x = fill_(_exp_(x if bias is None else bias.rows_(x, r0, c0), floor), rm, 0.0)
                if c0 < C:  # G = diag(u) P_row (g_r / u + vg): the sum of both directions' weights
                    x.mul_(torch.add(row_g[r0:r1, None], scaled[1][None, c0:c1], out=_tile(cbuf, nr, nc)))
                elif C:  # hard negatives in a two-direction call
                    x.mul_(row_g[r0:r1, None])
            else:
                x = ops.logits(r0, r1, c0, c1, _tile(buf, nr, nc))
                y = torch.sub(x, lse_c_safe[None, c0:c1], out=_tile(cbuf, nr, nc))
                if row_scale is not None:  # P_col / u_i for the folded row factor
                    y.sub_(scaled[2][r0:r1, None])
                x.add_(neg_lse_r[r0:r1, None])
                if bias is not None:
                    bias.columns_(y, r0, c0)
                    bias.rows_(x, r0, c0)
                fill_(_exp_(y, floor), cm, 0.0)
                fill_(_exp_(x, floor), rm, 0.0)
                x.mul_(row_g[r0:r1, None]).addcmul_(y, g_c[None, c0:c1])
            ops.accumulate(A, dK, x, r0, r1, c0, c1, q_rows)
    if A is not None and row_scale is not None:
        A.mul_(row_scale[:, None])
    return A, dK


class _PairLSE(torch.autograd.Function):
    """Row log-sum-exps over all keys and column log-sum-exps over the queries for the first
    ``plan.columns`` keys of ``s * q @ k.T``, masked, from one tiled pass; differentiable in
    q, k and s."""

    @staticmethod
    def forward(ctx, q, k, s, plan):
        with torch.no_grad(), _no_autocast(q):
            lse_r, lse_c, bound = _forward_pass(_Operands(q, k, s), plan)
        ctx.save_for_backward(q, k, s, lse_r, lse_c)
        ctx.plan, ctx.bound = plan, bound
        return lse_r, lse_c

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward runs under no_grad
    def backward(ctx, g_r, g_c):
        q, k, s, lse_r, lse_c = ctx.saved_tensors
        need_q, need_k, need_s = ctx.needs_input_grad[:3]
        with torch.no_grad(), _no_autocast(q):
            ops = _Operands(q, k, s, keep_query=True)
            g_r = torch.zeros_like(lse_r) if g_r is None else g_r.to(ops.cd)
            g_c = torch.zeros_like(lse_c) if g_c is None else g_c.to(ops.cd)
            A, dK = _backward_pass(ops, ctx.plan, lse_r, lse_c, g_r, g_c, ctx.bound, need_q or need_s, need_k)
            dq, dk, ds = _final_grads(A, dK, ops.qf, ops.scale, s, q, k, need_s, need_q)
        return dq, dk, ds, None


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


def _check_targets(targets, B: int, device) -> torch.Tensor:
    if targets is None:
        return torch.arange(B, device=device)
    if targets.shape != (B,) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be an int64 tensor of shape [{B}]")
    return targets


def _reduce(per_row: torch.Tensor, reduction: str, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if weights is None:
        return per_row.mean() if reduction == "mean" else per_row.sum()
    if weights.shape != per_row.shape or not weights.is_floating_point():
        raise ValueError(f"weights must be a float tensor of shape {tuple(per_row.shape)}, "
                         f"got {weights.dtype} {tuple(weights.shape)}")
    w = weights.detach().to(per_row.dtype)
    total = (w * per_row).sum()
    return total / w.sum() if reduction == "mean" else total


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


def paired_logsumexp(query, keys, logit_scale, *, targets=None, key_ids=None, query_ids=None, key_query_ids=None,
                     num_columns: int = 0, block_size=None, exclusions=None, key_bias=None,
                     query_bias=None, score_ceiling=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row log-sum-exps of ``logit_scale * query @ keys.T`` over all keys and column
    log-sum-exps over these queries for ``keys[:num_columns]``, from ONE tiled pass, with one
    mask rule for both directions.

    Entry (i, j) is left out of row i's and column j's sums when j is not ``targets[i]`` and
    key j shares the item id of row i's positive (``key_ids``) or the query id of row i
    (``query_ids`` against ``key_query_ids``); id -1 never matches. Building block of the
    training loss (``clicktower.modeling.losses.ContrastiveLoss``): keys are the batch's items
    (the columns) followed by hard negatives; across devices the columns are partial sums
    over this rank's queries. 8 * B * N * D FLOPs forward + backward, whatever num_columns.

    Args:
        query: [B, D] queries (fp32, bf16, fp16 or fp64).
        keys: [N, D] keys, same device.
        logit_scale: 0-dim tensor multiplying the dot products; receives a gradient.
        targets: [B] int64 column of each row's positive; default ``arange(B)``.
        key_ids: [N] int64 item id of every key.
        query_ids: [B] int64 query id of every row; needs ``key_query_ids``.
        key_query_ids: [N] int64 query id of the pair each key comes from (-1 for hard
            negatives); needs ``query_ids``.
        num_columns: C, how many leading keys get a column log-sum-exp (0 <= C <= N).
        block_size: queries and keys per tile; default ``DEFAULT_BLOCK_SIZE``.
        exclusions: optional per-sample exclusions ``(row_side, col_side)``, each int64
            ``[B]`` / ``[N]`` (one id) or ``[B, E]`` / ``[N, E]`` (a list of ids padded with
            -1): entry (i, j), other than ``targets[i]``, is also left out of both sums when
            the two sides share an id. ``(exclude_ids [B, E], key item ids [N])`` masks the
            items row i excludes (and row i's query for those items); with the rows being
            items and the keys queries, ``(row item ids [B], the keys' exclude lists [N, E])``.
        key_bias: [N] float, optional: added to every row's logit of key j except at the
            row's positive (``targets[i]``), e.g. ``-log q_j`` of the logQ popularity
            correction. No gradient; finite.
        query_bias: [B] float, optional: added to every column's logit of query i except at
            the positive entry (i, ``targets[i]``): the item->query direction's correction.
        score_ceiling: optional ``(ceiling [B] float, first)``: key j >= ``first`` (a
            row-only key: ``first >= num_columns``) is also left out of row i's sum when the
            raw dot product ``query[i] . keys[j]`` exceeds ``ceiling[i]`` (never the
            positive): the cross-batch memory's false-negative filter. ``inf`` keeps all.

    Returns:
        (row_lse [B], col_lse [C]) in fp32 (fp64 for fp64 inputs); a column whose every
        entry is masked has -inf.
    """
    _check_common(query, keys)
    B, N = query.shape[0], keys.shape[0]
    s = _scale_tensor(logit_scale, query)
    targets = _check_targets(targets, B, query.device)
    key_ids = _check_ids(key_ids, N, "key_ids")
    query_ids = _check_ids(query_ids, B, "query_ids")
    key_query_ids = _check_ids(key_query_ids, N, "key_query_ids")
    if (query_ids is None) != (key_query_ids is None):
        raise ValueError("query_ids and key_query_ids are given together or not at all")
    num_columns = int(num_columns)
    if not 0 <= num_columns <= N:
        raise ValueError(f"num_columns must lie in [0, {N}], got {num_columns}")
    kinds = []
    if key_ids is not None:
        kinds.append((key_ids[targets], key_ids))
    if query_ids is not None:
        kinds.append((query_ids, key_query_ids))
    if exclusions is not None:
        kinds.append(_check_exclusions(exclusions, B, N))
    key_bias, query_bias = _check_bias(key_bias, N, "key_bias"), _check_bias(query_bias, B, "query_bias")
    bias = None if key_bias is None and query_bias is None else _Bias(key_bias, query_bias, targets)
    ceiling = _check_ceiling(score_ceiling, query, keys, num_columns, targets)
    plan = _Plan(B, N, num_columns, _check_block(block_size), query.device, targets, kinds, bias=bias,
                 ceiling=ceiling)
    return _PairLSE.apply(query, keys, s, plan)


def _check_ceiling(score_ceiling, query, keys, num_columns: int, targets) -> Optional[ScoreCeiling]:
    """The :class:`ScoreCeiling` of ``score_ceiling`` (see :func:`paired_logsumexp`), or None."""
    if score_ceiling is None:
        return None
    if not (isinstance(score_ceiling, (tuple, list)) and len(score_ceiling) == 2):
        raise ValueError("score_ceiling must be a pair (ceiling [B], first key)")
    ceiling, first = score_ceiling
    B, N = query.shape[0], keys.shape[0]
    ceiling = _check_bias(ceiling, B, "score_ceiling's ceiling")  # the same [B] float constant check
    first = int(first)
    if not num_columns <= first <= N:
        raise ValueError(f"score_ceiling: the first key must lie in [num_columns={num_columns}, {N}], got {first}")
    return ScoreCeiling(query, keys, ceiling.to(query.device), first, targets, _compute_dtype(query, keys),
                        _on_host(query.device))


def _check_bias(bias, n: int, name: str):
    """A [n] float bias, detached (biases are constants), or None."""
    if bias is None:
        return None
    if not torch.is_tensor(bias) or bias.shape != (n,) or not bias.is_floating_point():
        raise ValueError(f"{name} must be a float tensor of shape [{n}], got "
                         f"{getattr(bias, 'dtype', type(bias))} {tuple(getattr(bias, 'shape', ()))}")
    return bias.detach()


def _check_exclusions(exclusions, B: int, N: int):
    """``(row_side, col_side)`` of :func:`paired_logsumexp`, checked."""
    if not (isinstance(exclusions, (tuple, list)) and len(exclusions) == 2):
        raise ValueError("exclusions must be a pair (row side, column side)")
    for side, n, name in ((exclusions[0], B, "row"), (exclusions[1], N, "column")):
        if not torch.is_tensor(side) or side.dtype != torch.int64 or side.dim() not in (1, 2) \
                or side.shape[0] != n:
            raise ValueError(f"exclusions: the {name} side must be an int64 tensor of shape [{n}] or "
                             f"[{n}, E], got {getattr(side, 'dtype', type(side))} {tuple(getattr(side, 'shape', ()))}")
    return tuple(exclusions)


def contrastive_logsumexp(query, keys, logit_scale, *, targets=None, key_ids=None, block_size=None,
                          query_ids=None, key_query_ids=None, exclude_ids=None):
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
        query_ids: [B] int64 optional query id per row; with ``key_query_ids`` ([N], the query
            id of the pair each key comes from), keys of a pair with the row's query id (other
            than the positive) are left out too. -1 never matches.
        key_query_ids: see ``query_ids``.
        exclude_ids: [B, E] int64 optional, padded with -1: keys whose ``key_ids`` value is in
            row i's list (other than its positive) are left out of row i's sum; needs
            ``key_ids``.

    Returns:
        [B] fp32 (fp64 for fp64 inputs) log-sum-exp per query.
    """
    lse, _ = paired_logsumexp(query, keys, logit_scale, targets=targets, key_ids=key_ids, query_ids=query_ids,
                              key_query_ids=key_query_ids, block_size=block_size,
                              exclusions=_exclusions(exclude_ids, key_ids))
    return lse


def _exclusions(exclude_ids, key_ids):
    """``(exclude_ids, key_ids)`` for :func:`paired_logsumexp`, or None without exclusions."""
    if exclude_ids is None:
        return None
    if key_ids is None:
        raise ValueError("exclude_ids needs key_ids (the item id of every key)")
    return exclude_ids, key_ids


def symmetric_logsumexp(query, keys, logit_scale, *, query_ids=None, key_ids=None, block_size=None,
                        exclude_ids=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exps of ``logit_scale * query @ keys.T`` for paired rows
    (N == B), from one tiled pass; masks as in :func:`fused_symmetric_contrastive_loss`.

    Args:
        query: [B, D]; keys: [B, D]; logit_scale: 0-dim tensor.
        query_ids, key_ids: optional [B] int64 ids (-1 never matches).
        block_size: tile side (queries and keys per tile).
        exclude_ids: optional [B, E] int64 lists (-1 padded; needs ``key_ids``): entry (i, j),
            i != j, leaves both directions when ``key_ids[j]`` is in row i's list.

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
    # Each direction its own ids: rows by key ids, columns by query ids.
    row_kinds = [(key_ids, key_ids)] if key_ids is not None else []
    col_kinds = [(query_ids, query_ids)] if query_ids is not None else []
    exclusions = _exclusions(exclude_ids, key_ids)
    if exclusions is not None:  # the same entries in both directions
        exclusions = _check_exclusions(exclusions, B, B)
        row_kinds.append(exclusions)
        col_kinds.append(exclusions)
    plan = _Plan(B, B, B, _check_block(block_size), query.device, torch.arange(B, device=query.device),
                 row_kinds, col_kinds)
    return _PairLSE.apply(query, keys, s, plan)


def fused_contrastive_loss(query, keys, logit_scale, *, targets=None, key_ids=None, block_size=None,
                           reduction: str = "mean", query_ids=None, key_query_ids=None, weights=None,
                           exclude_ids=None):
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
        query_ids: [B] int64 optional, with ``key_query_ids`` [N]: keys of a pair with query
            i's id, other than the positive, are left out too (see
            :func:`contrastive_logsumexp`).
        key_query_ids: see ``query_ids``.
        weights: [B] float optional per-query weights: "mean" gives
            ``sum_i w_i l_i / sum_i w_i``, "sum" gives ``sum_i w_i l_i``.
        exclude_ids: [B, E] int64 optional per-query exclusions (see
            :func:`contrastive_logsumexp`).

    Returns:
        0-dim fp32 loss (fp64 for fp64 inputs).
    """
    lse = contrastive_logsumexp(query, keys, logit_scale, targets=targets, key_ids=key_ids, block_size=block_size,
                                query_ids=query_ids, key_query_ids=key_query_ids, exclude_ids=exclude_ids)
    pos = positive_logits(query, keys, logit_scale, targets)
    return _reduce(lse - pos, reduction, weights)


def fused_symmetric_contrastive_loss(query, keys, logit_scale, *, query_ids=None, key_ids=None,
                                     block_size=None, reduction: str = "mean", weights=None, exclude_ids=None):
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
        weights: [B] float optional per-pair weights, the same for both directions of pair
            i: "mean" divides the weighted sums by ``sum_i w_i`` instead of B.
        exclude_ids: [B, E] int64 optional (needs ``key_ids``): key j leaves query i's
            denominator, and query i leaves key j's, when ``key_ids[j]`` is in row i's list.

    Returns:
        0-dim fp32 loss (fp64 for fp64 inputs).
    """
    lse_r, lse_c = symmetric_logsumexp(query, keys, logit_scale, query_ids=query_ids, key_ids=key_ids,
                                       block_size=block_size, exclude_ids=exclude_ids)
    pos = positive_logits(query, keys, logit_scale)
    return 0.5 * (_reduce(lse_r - pos, reduction, weights) + _reduce(lse_c - pos, reduction, weights))
