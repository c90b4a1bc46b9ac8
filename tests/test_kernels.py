"""Correctness of the fused contrastive losses against the materialised reference."""
import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clicktower.kernels import (
    contrastive_logsumexp,
    fused_contrastive_loss,
    fused_symmetric_contrastive_loss,
    paired_logsumexp,
    symmetric_logsumexp,
)

pytestmark = pytest.mark.unit

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"


# ---------------------------------------------------------------- references
def _dup_mask(anchor_ids, other_ids, pos):
    """[A, O] True where other shares the anchor's id, except the anchor's positive."""
    m = (anchor_ids[:, None] == other_ids[None, :]) & (anchor_ids[:, None] != -1)
    m[torch.arange(len(anchor_ids)), pos] = False
    return m


def ref_loss(q, k, s, targets=None, key_ids=None, reduction="mean"):
    B = q.shape[0]
    targets = torch.arange(B) if targets is None else targets
    logits = s * q @ k.T
    if key_ids is not None:
        logits = logits.masked_fill(_dup_mask(key_ids[targets], key_ids, targets), float("-inf"))
    return F.cross_entropy(logits, targets, reduction=reduction)


def ref_sym(q, k, s, query_ids=None, key_ids=None, reduction="mean"):
    B = q.shape[0]
    ar = torch.arange(B)
    logits = s * q @ k.T
    lr, lc = logits, logits.T
    if key_ids is not None:
        lr = lr.masked_fill(_dup_mask(key_ids, key_ids, ar), float("-inf"))
    if query_ids is not None:
        lc = lc.masked_fill(_dup_mask(query_ids, query_ids, ar), float("-inf"))
    return 0.5 * (F.cross_entropy(lr, ar, reduction=reduction) + F.cross_entropy(lc, ar, reduction=reduction))


def _inputs(B, N, D, dtype=torch.float64, scale=3.0, seed=0, normalize=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=g, dtype=torch.float64)
    k = torch.randn(N, D, generator=g, dtype=torch.float64)
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    q = q.to(dtype).requires_grad_()
    k = k.to(dtype).requires_grad_()
    s = torch.tensor(scale, dtype=dtype if dtype == torch.float64 else torch.float32, requires_grad=True)
    return q, k, s


def _grads(fn, q, k, s):
    q.grad = k.grad = s.grad = None
    loss = fn(q, k, s)
    loss.backward()
    out = (loss.detach(), q.grad.clone(), k.grad.clone(), s.grad.clone())
    q.grad = k.grad = s.grad = None
    return out


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _assert_close(got, want, tol, what=""):
    names = ("loss", "grad_query", "grad_keys", "grad_scale")
    for name, a, b in zip(names, got, want):
        assert torch.isfinite(a).all(), f"{what} {name} not finite"
        err = _rel(a, b)
        assert err <= tol, f"{what} {name}: relative error {err:.2e} > {tol:.0e}"


def _fp64_copies(q, k, s):
    return (q.detach().double().requires_grad_(), k.detach().double().requires_grad_(),
            s.detach().double().requires_grad_())


# ---------------------------------------------------------------- gradcheck (fp64)
@pytest.mark.parametrize("block", [3, 4, 64])
def test_gradcheck_one_direction_masks_and_ragged_blocks(block):
    q, k, s = _inputs(6, 11, 4)  # block 3/4 do not divide N=11 (nor B=6 for 4)
    targets = torch.tensor([3, 0, 7, 10, 5, 3])
    key_ids = torch.tensor([0, 1, 2, 0, 4, 1, -1, 0, -1, 2, 2])  # duplicates and -1
    fn = lambda q, k, s: fused_contrastive_loss(q, k, s, targets=targets, key_ids=key_ids, block_size=block)
    assert torch.autograd.gradcheck(fn, (q, k, s))
    torch.testing.assert_close(fn(q, k, s), ref_loss(q, k, s, targets, key_ids))


@pytest.mark.parametrize("block", [2, 5, 64])
def test_gradcheck_symmetric_masks_and_ragged_blocks(block):
    q, k, s = _inputs(7, 7, 4, seed=1)
    query_ids = torch.tensor([0, 1, 0, -1, 2, 1, -1])
    key_ids = torch.tensor([5, 5, 6, 7, -1, 5, -1])
    fn = lambda q, k, s: fused_symmetric_contrastive_loss(q, k, s, query_ids=query_ids, key_ids=key_ids, block_size=block)
    assert torch.autograd.gradcheck(fn, (q, k, s))
    torch.testing.assert_close(fn(q, k, s), ref_sym(q, k, s, query_ids, key_ids))


def test_gradcheck_sum_reduction_and_lse_building_blocks():
    q, k, s = _inputs(5, 9, 3, seed=2)
    t = torch.tensor([8, 1, 1, 4, 0])
    assert torch.autograd.gradcheck(
        lambda q, k, s: fused_contrastive_loss(q, k, s, targets=t, block_size=4, reduction="sum"), (q, k, s))
    assert torch.autograd.gradcheck(lambda q, k, s: contrastive_logsumexp(q, k, s, block_size=2), (q, k, s))
    q2, k2, s2 = _inputs(5, 5, 3, seed=3)
    assert torch.autograd.gradcheck(lambda q, k, s: symmetric_logsumexp(q, k, s, block_size=2), (q2, k2, s2))
    lr, lc = symmetric_logsumexp(q2, k2, s2, block_size=2)
    logits = s2 * q2 @ k2.T
    torch.testing.assert_close(lr, logits.logsumexp(1))
    torch.testing.assert_close(lc, logits.logsumexp(0))


# ---------------------------------------------------------------- fp32 vs reference
def test_fp32_matches_reference_random_shapes():
    gen = torch.Generator().manual_seed(1234)
    for trial in range(12):
        B = int(torch.randint(1, 70, (1,), generator=gen))
        N = B + int(torch.randint(0, 90, (1,), generator=gen))
        D = int(torch.randint(1, 40, (1,), generator=gen))
        block = int(torch.randint(1, 50, (1,), generator=gen))
        scale = float(torch.empty(1).uniform_(0.5, 30, generator=gen))
        q, k, s = _inputs(B, N, D, torch.float32, scale, seed=trial, normalize=True)
        targets = torch.randint(0, N, (B,), generator=gen)
        key_ids = torch.randint(-1, max(2, N // 3), (N,), generator=gen)  # many duplicates
        for t, ids in ((None, None), (targets, None), (targets, key_ids)):
            got = _grads(lambda q, k, s: fused_contrastive_loss(q, k, s, targets=t, key_ids=ids, block_size=block), q, k, s)
            want = _grads(lambda q, k, s: ref_loss(q, k, s, t, ids), *_fp64_copies(q, k, s))
            _assert_close(got, want, 1e-5, f"trial {trial} B={B} N={N} D={D} block={block}")
        # symmetric on the first B keys
        k_sq = k.detach()[:B].clone().requires_grad_()
        qids = torch.randint(-1, max(2, B // 3), (B,), generator=gen)
        kids = torch.randint(-1, max(2, B // 3), (B,), generator=gen)
        for a, b in ((None, None), (qids, kids)):
            got = _grads(lambda q, k, s: fused_symmetric_contrastive_loss(q, k, s, query_ids=a, key_ids=b, block_size=block), q, k_sq, s)
            want = _grads(lambda q, k, s: ref_sym(q, k, s, a, b), *_fp64_copies(q, k_sq, s))
            _assert_close(got, want, 1e-5, f"sym trial {trial} B={B} D={D} block={block}")


def test_sum_reduction_is_batch_times_mean():
    q, k, s = _inputs(13, 20, 8, torch.float32, seed=5)
    m = fused_contrastive_loss(q, k, s, reduction="mean")
    torch.testing.assert_close(fused_contrastive_loss(q, k, s, reduction="sum"), 13 * m)
    k2 = k.detach()[:13].clone()
    ms = fused_symmetric_contrastive_loss(q, k2, s)
    torch.testing.assert_close(fused_symmetric_contrastive_loss(q, k2, s, reduction="sum"), 13 * ms)
    torch.testing.assert_close(ms, ref_sym(q, k2, s))
    with pytest.raises(ValueError):
        fused_contrastive_loss(q, k, s, reduction="none")


@pytest.mark.parametrize("sym", [False, True])
def test_extreme_logit_scale_no_overflow(sym):
    # Scale 100 on unit vectors: logits span [-100, 100], shifted ones reach -200 (the
    # clamp against denormals is active) -- results must stay finite and exact.
    B, D = 64, 16
    q, k, s = _inputs(B, 3 * B if not sym else B, D, torch.float32, 100.0, seed=7, normalize=True)
    with torch.no_grad():  # a few positives nearly aligned, a few anti-aligned keys
        k[:8] = q[:8] + 0.01 * torch.randn(8, D)
        k[8:16] = -q[8:16]
    ids = torch.arange(k.shape[0]) % 50
    if sym:
        fn = lambda q, k, s: fused_symmetric_contrastive_loss(q, k, s, query_ids=ids, key_ids=ids, block_size=24)
        rf = lambda q, k, s: ref_sym(q, k, s, ids, ids)
    else:
        fn = lambda q, k, s: fused_contrastive_loss(q, k, s, key_ids=ids, block_size=24)
        rf = lambda q, k, s: ref_loss(q, k, s, key_ids=ids)
    got = _grads(fn, q, k, s)
    want = _grads(rf, *_fp64_copies(q, k, s))
    _assert_close(got, want, 1e-5, "scale 100")


@pytest.mark.parametrize("sym", [False, True])
def test_bf16_close_to_fp32_reference_and_fp16_runs(sym):
    B, N, D = 48, 48 if sym else 100, 32
    q32, k32, s32 = _inputs(B, N, D, torch.float32, 10.0, seed=9, normalize=True)
    fn = (lambda q, k, s: fused_symmetric_contrastive_loss(q, k, s, block_size=16)) if sym else \
        (lambda q, k, s: fused_contrastive_loss(q, k, s, block_size=16))
    rf = ref_sym if sym else ref_loss
    for dtype in (torch.bfloat16, torch.float16):
        q = q32.detach().to(dtype).requires_grad_()
        k = k32.detach().to(dtype).requires_grad_()
        s = s32.detach().clone().requires_grad_()
        loss, gq, gk, gs = _grads(fn, q, k, s)
        assert loss.dtype == torch.float32 and gq.dtype == dtype and gk.dtype == dtype
        # reference: fp32 math on the same (rounded) inputs
        want = _grads(rf, q.detach().float().requires_grad_(), k.detach().float().requires_grad_(),
                      s.detach().clone().requires_grad_())
        for name, a, b in zip(("loss", "gq", "gk", "gs"), (loss, gq, gk, gs), want):
            assert torch.isfinite(a.float()).all(), (dtype, name)
            assert _rel(a.float(), b) <= 1e-2, (dtype, name, _rel(a.float(), b))


def test_only_requested_gradients_and_validation():
    q, k, s = _inputs(8, 12, 4, torch.float32, seed=11)
    k_frozen = k.detach()
    fused_contrastive_loss(q, k_frozen, s, block_size=5).backward()
    want = _grads(lambda q, k, s: ref_loss(q, k, s), *_fp64_copies(q, k, s))
    assert _rel(q.grad, want[1]) <= 1e-5 and _rel(s.grad, want[3]) <= 1e-5
    with pytest.raises(ValueError):
        fused_symmetric_contrastive_loss(q, k, s)  # N != B
    with pytest.raises(ValueError):
        fused_contrastive_loss(q, k, s, key_ids=torch.zeros(3, dtype=torch.int64))
    assert math.isfinite(float(fused_contrastive_loss(q, k, 2.0).detach()))  # float scale accepted


def test_kernels_never_import_triton():
    for path in sorted(KERNELS_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                    "import_module", "__import__"):
                names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            assert not any(n.split(".")[0] == "triton" for n in names), f"{path} imports triton"


def test_autocast_keeps_fp32_accumulation():
    q, k, s = _inputs(9, 9, 6, torch.float32, 5.0, seed=13)
    want = _grads(lambda q, k, s: fused_symmetric_contrastive_loss(q, k, s, block_size=4), q, k, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(lambda q, k, s: fused_symmetric_contrastive_loss(q, k, s, block_size=4), q, k, s)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_symmetric_one_exp_fast_path_and_exact_fallbacks_agree(monkeypatch):
    """The symmetric kernel shares one exp between its two directions where the spread of
    the values allows it, and falls back to separate exps per direction elsewhere: tiles
    holding duplicate ids, tiles where a column's max lies far below the tile's max
    (forward), and lse values spanning many nats (backward). Every mix must match the
    reference, in fp32 at 1e-5 as everywhere else."""
    import clicktower.kernels.contrastive as C

    taken = []
    real = C._sym_tile_fast
    monkeypatch.setattr(C, "_sym_tile_fast", lambda *a: taken.append(real(*a)) or taken[-1])
    B, D, block = 48, 16, 16
    g = torch.Generator().manual_seed(3)
    v = F.normalize(torch.randn(D, generator=g, dtype=torch.float64), dim=0)
    q = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    # First row block all along v; keys 8..15 point the other way: at scale 80 their columns
    # peak ~160 nats below that tile's max, which forces the forward's exact path there.
    q[:16] = F.normalize(v + 0.05 * q[:16], dim=1)
    k[:8] = F.normalize(v + 0.05 * k[:8], dim=1)
    k[8:16] = F.normalize(-v + 0.05 * k[8:16], dim=1)
    ids = torch.arange(B)
    ids[40] = 45  # one duplicate pair, inside the last diagonal tile only
    for scale, dtype in ((80.0, torch.float32), (2.0, torch.float32), (80.0, torch.float64)):
        qq = q.to(dtype).requires_grad_()
        kk = k.to(dtype).requires_grad_()
        s = torch.tensor(scale, dtype=dtype, requires_grad=True)
        taken.clear()
        got = _grads(lambda q, k, s: fused_symmetric_contrastive_loss(q, k, s, query_ids=ids, key_ids=ids, block_size=block), qq, kk, s)
        want = _grads(lambda q, k, s: ref_sym(q, k, s, ids, ids), *_fp64_copies(qq, kk, s))
        _assert_close(got, want, 1e-5 if dtype == torch.float32 else 1e-10, f"scale {scale} {dtype}")
        # 9 tiles: the duplicate's tile never tries the fast path; at scale 80 the first tile
        # (opposed keys) falls back, at scale 2 nothing does.
        assert len(taken) == 8
        assert (taken[0], all(taken)) == ((False, False) if scale == 80.0 else (True, True))
    with torch.no_grad():
        lse = torch.cat(symmetric_logsumexp(q, k, torch.tensor(80.0, dtype=torch.float64)))
    assert float(lse.max() - lse.min()) > C._FAST_SPREAD  # so the scale-80 backward ran its exact path


# ---------------------------------------------------------------- the training kernel: one pass, one mask rule
def ref_mask(B, N, targets, key_ids=None, query_ids=None, key_query_ids=None):
    """[B, N] True where entry (i, j) leaves the sums: j is not row i's positive and key j has
    the item id of row i's positive or the query id of row i (-1 never matches)."""
    masked = torch.zeros(B, N, dtype=torch.bool)
    if key_ids is not None:
        anchor = key_ids[targets]
        masked |= (key_ids[None, :] == anchor[:, None]) & (anchor[:, None] != -1)
    if query_ids is not None:
        masked |= (key_query_ids[None, :] == query_ids[:, None]) & (query_ids[:, None] != -1)
    masked[torch.arange(B), targets] = False
    return masked


def ref_paired(q, k, s, targets, key_ids=None, query_ids=None, key_query_ids=None, columns=0):
    """paired_logsumexp by its definition: entry (i, j) leaves row i's and column j's sums
    when j is not row i's positive and key j has the item id of row i's positive or the
    query id of row i (-1 never matches)."""
    masked = ref_mask(q.shape[0], k.shape[0], targets, key_ids, query_ids, key_query_ids)
    x = (s * q @ k.T).masked_fill(masked, float("-inf"))
    return x.logsumexp(1), x[:, :columns].logsumexp(0)


def _paired_case():
    """6 local queries (rows 2..7 of a global batch of 8 items) against the 8 items and 3 hard
    negatives: columns 0 and 1 have no positive here (partial columns, as on a second rank).
    Column 0 shares an item or a query with every row (all masked, lse -inf), column 1 only
    with some; -1 ids among rows and keys."""
    targets = torch.arange(2, 8)
    key_ids = torch.tensor([5, 9, 5, -1, 5, 9, 5, 5, 9, -1, 5])      # items 0..7, hard negatives 8..10
    key_query_ids = torch.tensor([2, 7, 2, 2, 4, 2, 6, -1, -1, -1, -1])
    return targets, key_ids, key_query_ids[targets], key_query_ids


def _as_device(monkeypatch):
    """Run the kernel as on a GPU: dense masks, per-call decisions, no per-tile host reads."""
    import clicktower.kernels.contrastive as C

    monkeypatch.setattr(C, "_on_host", lambda device: False)


@pytest.mark.parametrize("mode", ["sparse", "dense", "device"])
@pytest.mark.parametrize("block", [2, 3, 64])
def test_paired_lse_one_rule_hard_negatives_partial_columns_gradcheck(monkeypatch, mode, block):
    """fp64 gradcheck and the definition, with the CPU's sparse masks, the dense masks it
    falls back to when ids collide too often, and the GPU's dense per-call path."""
    import clicktower.kernels.pair_masks as PM

    if mode == "dense":
        monkeypatch.setattr(PM, "_SPARSE_PAIRS_PER_ROW", 0)
    if mode == "device":
        _as_device(monkeypatch)
    q, k, s = _inputs(6, 11, 4, seed=21)
    targets, key_ids, query_ids, key_query_ids = _paired_case()
    fn = lambda q, k, s: paired_logsumexp(q, k, s, targets=targets, key_ids=key_ids, query_ids=query_ids,
                                          key_query_ids=key_query_ids, num_columns=8, block_size=block)
    got, want = fn(q, k, s), ref_paired(q, k, s, targets, key_ids, query_ids, key_query_ids, 8)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    finite = torch.isfinite(want[1])
    assert not finite[0] and finite[1:].all()  # a partial column with every entry masked
    assert torch.autograd.gradcheck(lambda q, k, s: (lambda r, c: (r, c[finite]))(*fn(q, k, s)), (q, k, s))


@pytest.mark.parametrize("scale", [2.0, 80.0])
def test_paired_lse_fp32_host_and_device_paths_match_reference(monkeypatch, scale):
    """Random shapes, many duplicate ids, on the CPU's per-tile path and the GPU's per-call one
    (at scale 80 the device-side choice between the one-exp and the exact column sums and the
    backward's exact path run; at scale 2 the one-exp paths everywhere)."""
    gen = torch.Generator().manual_seed(77)
    for trial in range(6):
        B = int(torch.randint(1, 40, (1,), generator=gen))
        C = B + int(torch.randint(0, 20, (1,), generator=gen))
        N = C + int(torch.randint(0, 15, (1,), generator=gen))
        block = int(torch.randint(1, 30, (1,), generator=gen))
        q, k, s = _inputs(B, N, 8, torch.float32, scale, seed=trial, normalize=True)
        targets = torch.randperm(C, generator=gen)[:B]
        key_ids = torch.randint(-1, max(2, N // 3), (N,), generator=gen)
        key_qids = torch.randint(-1, max(2, N // 3), (N,), generator=gen)
        key_qids[C:] = -1
        qids = key_qids[targets]
        w_r, w_c = torch.rand(B, generator=gen), torch.rand(C, generator=gen)

        def fn(q, k, s):
            r, c = paired_logsumexp(q, k, s, targets=targets, key_ids=key_ids, query_ids=qids,
                                    key_query_ids=key_qids, num_columns=C, block_size=block)
            return (r * w_r).sum() + torch.where(torch.isfinite(c), c, torch.zeros_like(c)).mul(w_c).sum()

        def ref(q, k, s):
            r, c = ref_paired(q, k, s, targets, key_ids, qids, key_qids, C)
            return (r * w_r).sum() + torch.where(torch.isfinite(c), c, torch.zeros_like(c)).mul(w_c).sum()

        want = _grads(ref, *_fp64_copies(q, k, s))
        _assert_close(_grads(fn, q, k, s), want, 1e-5, f"host trial {trial}")
        with monkeypatch.context() as m:
            _as_device(m)
            _assert_close(_grads(fn, q, k, s), want, 1e-5, f"device trial {trial}")


def _count_host_reads(monkeypatch) -> dict:
    """Count what reads tensor values back to the host (each a GPU sync)."""
    counter = {"n": 0}
    for name in ("__bool__", "__float__", "__int__", "item", "tolist", "nonzero", "repeat_interleave"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            counter["n"] += 1
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    for name in ("nonzero", "repeat_interleave"):
        real_fn = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real_fn, **kw: counter.update(n=counter["n"] + 1)
                            or _real(*a, **kw))
    return counter


@pytest.mark.parametrize("scale", [2.0, 80.0])
def test_device_mode_reads_the_host_at_most_once_per_pass(monkeypatch, scale):
    """As on a GPU, one forward and one backward of the training kernel (ids, hard negatives,
    partial columns, many tiles) read at most one value back each -- not one per tile."""
    _as_device(monkeypatch)
    q, k, s = _inputs(6, 11, 4, torch.float32, scale, seed=5, normalize=True)
    targets, key_ids, query_ids, key_query_ids = _paired_case()
    want = ref_paired(q, k, s, targets, key_ids, query_ids, key_query_ids, 8)
    reads = _count_host_reads(monkeypatch)
    lse_r, lse_c = paired_logsumexp(q, k, s, targets=targets, key_ids=key_ids, query_ids=query_ids,
                                    key_query_ids=key_query_ids, num_columns=8, block_size=2)
    forward_reads = reads["n"]
    loss = lse_r.sum() + torch.where(torch.isfinite(lse_c), lse_c, torch.zeros_like(lse_c)).sum()
    loss.backward()
    backward_reads = reads["n"] - forward_reads
    monkeypatch.undo()
    assert forward_reads <= 1 and backward_reads <= 1, (forward_reads, backward_reads)
    torch.testing.assert_close(lse_r, want[0])
    torch.testing.assert_close(lse_c, want[1])
    assert reads["n"] > 0  # the counter does see the reads (e.g. the spread check)


def test_cpu_host_reads_are_counted_per_tile(monkeypatch):
    """The counter above is not blind: on the CPU the kernel does read per tile (free there)."""
    q, k, s = _inputs(6, 11, 4, torch.float32, 80.0, seed=5, normalize=True)
    targets, key_ids, query_ids, key_query_ids = _paired_case()
    reads = _count_host_reads(monkeypatch)
    paired_logsumexp(q, k, s, targets=targets, key_ids=key_ids, query_ids=query_ids, key_query_ids=key_query_ids,
                     num_columns=8, block_size=2)
    assert reads["n"] > 3 * 4  # one per two-direction tile (3 x 4 of them) and more


def test_weights_one_is_unweighted_and_weights_match_reference():
    q, k, s = _inputs(9, 14, 5, torch.float32, 6.0, seed=8, normalize=True)
    k_sq = k.detach()[:9].clone().requires_grad_()
    ones = torch.ones(9)
    for fn in (lambda q, k, s, w: fused_contrastive_loss(q, k, s, block_size=4, weights=w),
               lambda q, k, s, w: fused_contrastive_loss(q, k, s, block_size=4, reduction="sum", weights=w)):
        plain = _grads(lambda q, k, s: fn(q, k, s, None), q, k, s)
        unit = _grads(lambda q, k, s: fn(q, k, s, ones), q, k, s)
        for a, b in zip(unit, plain):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=0)
    plain = _grads(lambda q, k, s: fused_symmetric_contrastive_loss(q, k, s, block_size=4), q, k_sq, s)
    unit = _grads(lambda q, k, s: fused_symmetric_contrastive_loss(q, k, s, block_size=4, weights=ones), q, k_sq, s)
    for a, b in zip(unit, plain):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=0)
    w = torch.rand(9, generator=torch.Generator().manual_seed(3)) + 0.1

    def ref_weighted(q, k, s):
        logits = s * q @ k.T
        per_row = F.cross_entropy(logits, torch.arange(9), reduction="none")
        per_col = F.cross_entropy(logits.T, torch.arange(9), reduction="none")
        return 0.5 * ((w * per_row).sum() + (w * per_col).sum()) / w.sum()

    got = _grads(lambda q, k, s: fused_symmetric_contrastive_loss(q, k, s, block_size=4, weights=w), q, k_sq, s)
    _assert_close(got, _grads(ref_weighted, *_fp64_copies(q, k_sq, s)), 1e-5, "weighted symmetric")
    with pytest.raises(ValueError):
        fused_contrastive_loss(q, k, s, weights=torch.ones(3))


def test_bf16_inputs_run_bf16_tile_matmuls_with_fp32_results(monkeypatch):
    """bf16 inputs keep bf16 operands in every tile matmul (forward, recompute and both
    gradient GEMMs) and get fp32 products back; fp32 inputs stay fp32 throughout."""
    import clicktower.kernels.contrastive as C

    seen = []
    real = C._Operands.mm
    monkeypatch.setattr(C._Operands, "mm", lambda self, a, b, out: seen.append((a.dtype, b.dtype)) or
                        (lambda r: seen.append(r.dtype) or r)(real(self, a, b, out)))
    q, k, s = _inputs(10, 10, 8, torch.float32, 10.0, seed=4, normalize=True)
    for dtype in (torch.bfloat16, torch.float32):
        seen.clear()
        qq, kk = q.detach().to(dtype).requires_grad_(), k.detach().to(dtype).requires_grad_()
        ids = torch.arange(10)
        lse_r, lse_c = paired_logsumexp(qq, kk, s, key_ids=ids, query_ids=ids, key_query_ids=ids, num_columns=10,
                                        block_size=4)
        (lse_r.sum() + lse_c.sum()).backward()
        operands = [x for x in seen if isinstance(x, tuple)]
        assert all(x == (dtype, dtype) for x in operands), operands
        assert all(r == torch.float32 for r in seen if not isinstance(r, tuple))
        if dtype == torch.bfloat16:  # 9 tiles: logits, recompute and the two gradient GEMMs each
            assert len(operands) == 9 * 4


@pytest.mark.parametrize("device_mode", [False, True])
def test_columns_peaking_far_below_their_tile_take_the_exact_sums(monkeypatch, device_mode):
    """All queries along v, half the keys along -v, scale 80: those columns peak ~160 nats
    below the tile's max and hold nothing larger elsewhere, so a one-exp column sum would
    underflow to -inf. The CPU falls back per tile, the GPU path picks the exact sums per
    column on the device; both match the definition, values and gradients."""
    if device_mode:
        _as_device(monkeypatch)
    g = torch.Generator().manual_seed(12)
    v = F.normalize(torch.randn(16, generator=g, dtype=torch.float64), dim=0)
    q = F.normalize(v + 0.05 * torch.randn(12, 16, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(12, 16, generator=g, dtype=torch.float64), dim=1)
    k[:6] = F.normalize(v + 0.05 * k[:6], dim=1)
    k[6:] = F.normalize(-v + 0.05 * k[6:], dim=1)
    q, k = q.float().requires_grad_(), k.float().requires_grad_()
    s = torch.tensor(80.0, requires_grad=True)
    ids = torch.arange(12)
    ids[3] = 4  # a duplicate: the masked tile takes the same path
    w = torch.rand(24, generator=g)

    def fn(q, k, s):
        return (torch.cat(paired_logsumexp(q, k, s, key_ids=ids, query_ids=ids, key_query_ids=ids, num_columns=12,
                                                  block_size=16)) * w).sum()

    def ref(q, k, s):
        return (torch.cat(ref_paired(q, k, s, torch.arange(12), ids, ids, ids, 12)) * w).sum()

    with torch.no_grad():
        lse_c = ref_paired(q.double(), k.double(), s.double(), torch.arange(12), ids, ids, ids, 12)[1]
    assert float(lse_c[6:].max()) < -60  # the anti-aligned columns
    _assert_close(_grads(fn, q, k, s), _grads(ref, *_fp64_copies(q, k, s)), 1e-5, f"device {device_mode}")
