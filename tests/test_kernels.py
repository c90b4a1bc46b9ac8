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
    fn = lambda q, k, s: fused_contrastive_loss(q, k, s, targets, key_ids, block_size=block)
    assert torch.autograd.gradcheck(fn, (q, k, s))
    torch.testing.assert_close(fn(q, k, s), ref_loss(q, k, s, targets, key_ids))


@pytest.mark.parametrize("block", [2, 5, 64])
def test_gradcheck_symmetric_masks_and_ragged_blocks(block):
    q, k, s = _inputs(7, 7, 4, seed=1)
    query_ids = torch.tensor([0, 1, 0, -1, 2, 1, -1])
    key_ids = torch.tensor([5, 5, 6, 7, -1, 5, -1])
    fn = lambda q, k, s: fused_symmetric_contrastive_loss(q, k, s, query_ids, key_ids, block_size=block)
    assert torch.autograd.gradcheck(fn, (q, k, s))
    torch.testing.assert_close(fn(q, k, s), ref_sym(q, k, s, query_ids, key_ids))


def test_gradcheck_sum_reduction_and_lse_building_blocks():
    q, k, s = _inputs(5, 9, 3, seed=2)
    t = torch.tensor([8, 1, 1, 4, 0])
    assert torch.autograd.gradcheck(
        lambda q, k, s: fused_contrastive_loss(q, k, s, t, block_size=4, reduction="sum"), (q, k, s))
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
            got = _grads(lambda q, k, s: fused_contrastive_loss(q, k, s, t, ids, block_size=block), q, k, s)
            want = _grads(lambda q, k, s: ref_loss(q, k, s, t, ids), *_fp64_copies(q, k, s))
            _assert_close(got, want, 1e-5, f"trial {trial} B={B} N={N} D={D} block={block}")
        # symmetric on the first B keys
        k_sq = k.detach()[:B].clone().requires_grad_()
        qids = torch.randint(-1, max(2, B // 3), (B,), generator=gen)
        kids = torch.randint(-1, max(2, B // 3), (B,), generator=gen)
        for a, b in ((None, None), (qids, kids)):
            got = _grads(lambda q, k, s: fused_symmetric_contrastive_loss(q, k, s, a, b, block_size=block), q, k_sq, s)
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
        fn = lambda q, k, s: fused_symmetric_contrastive_loss(q, k, s, ids, ids, block_size=24)
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
        got = _grads(lambda q, k, s: fused_symmetric_contrastive_loss(q, k, s, ids, ids, block_size=block), qq, kk, s)
        want = _grads(lambda q, k, s: ref_sym(q, k, s, ids, ids), *_fp64_copies(qq, kk, s))
        _assert_close(got, want, 1e-5 if dtype == torch.float32 else 1e-10, f"scale {scale} {dtype}")
        # 9 tiles: the duplicate's tile never tries the fast path; at scale 80 the first tile
        # (opposed keys) falls back, at scale 2 nothing does.
        assert len(taken) == 8
        assert (taken[0], all(taken)) == ((False, False) if scale == 80.0 else (True, True))
    with torch.no_grad():
        lse = torch.cat(symmetric_logsumexp(q, k, torch.tensor(80.0, dtype=torch.float64)))
    assert float(lse.max() - lse.min()) > C._FAST_SPREAD  # so the scale-80 backward ran its exact path
