"""The fused kernel's per-column logit bias (logQ popularity correction) and its score ceiling
(the cross-batch memory's false-negative filter) against a dense reference: the corrected,
filtered InfoNCE written out in plain torch, values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from clicktower.kernels import paired_logsumexp
from test_kernels import ref_mask

pytestmark = pytest.mark.unit


def ref_biased(q, k, s, targets, key_ids=None, query_ids=None, key_query_ids=None, columns=0,
               key_bias=None, query_bias=None, ceiling=None):
    """Definition: masked entries leave both sums; row i sees x_ij + key_bias_j, column j sees
    x_ij + query_bias_i, except at (i, targets[i]) which keeps x_it in both directions; with
    ``ceiling=(c, first)`` keys j >= first with q_i . k_j > c_i also leave row i's sum."""
    B, N = q.shape[0], k.shape[0]
    masked = ref_mask(B, N, targets, key_ids, query_ids, key_query_ids)
    positive = torch.zeros(B, N, dtype=torch.bool)
    positive[torch.arange(B), targets] = True
    if ceiling is not None:
        over = (q @ k.T).detach() > ceiling[0][:, None].to(q.dtype)
        over[:, :ceiling[1]] = False
        masked = masked | (over & ~positive)
    x = s * q @ k.T
    xr = x if key_bias is None else torch.where(positive, x, x + key_bias[None, :].to(x.dtype))
    xc = x if query_bias is None else torch.where(positive, x, x + query_bias[:, None].to(x.dtype))
    return xr.masked_fill(masked, float("-inf")).logsumexp(1), xc.masked_fill(masked, float("-inf"))[:, :columns].logsumexp(0)


def _case(B=6, N=11, D=4, dtype=torch.float64, seed=3, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    s = torch.tensor(scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32, requires_grad=True)
    targets = torch.arange(2, 2 + B)
    key_ids = torch.tensor([5, 9, 5, -1, 5, 9, 5, 5, 9, -1, 5])[:N]
    key_query_ids = torch.tensor([2, 7, 2, 2, 4, 2, 6, -1, -1, -1, -1])[:N]
    key_bias = -torch.log(torch.rand(N, generator=g, dtype=torch.float64) * 0.5 + 0.01)
    query_bias = -torch.log(torch.rand(B, generator=g, dtype=torch.float64) * 0.5 + 0.01)
    return q, k, s, targets, key_ids, key_query_ids[targets], key_query_ids, key_bias, query_bias


def _device(monkeypatch):
    import clicktower.kernels.contrastive as C

    monkeypatch.setattr(C, "_on_host", lambda device: False)


@pytest.mark.parametrize("mode", ["sparse", "dense", "device"])
@pytest.mark.parametrize("block", [3, 64])
def test_biased_lse_matches_dense_reference_and_gradcheck(monkeypatch, mode, block):
    """Masks, hard negatives, partial columns (no positive on two of them) and both biases:
    the definition, and fp64 gradcheck, on the CPU's sparse and dense masks and the GPU path."""
    import clicktower.kernels.pair_masks as PM

    if mode == "dense":
        monkeypatch.setattr(PM, "_SPARSE_PAIRS_PER_ROW", 0)
    if mode == "device":
        _device(monkeypatch)
    q, k, s, targets, key_ids, qids, kqids, kb, qb = _case()
    fn = lambda q, k, s: paired_logsumexp(q, k, s, targets=targets, key_ids=key_ids, query_ids=qids,
                                          key_query_ids=kqids, num_columns=8, block_size=block,
                                          key_bias=kb, query_bias=qb)
    got = fn(q, k, s)
    want = ref_biased(q, k, s, targets, key_ids, qids, kqids, 8, kb, qb)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    unbiased = paired_logsumexp(q, k, s, targets=targets, key_ids=key_ids, query_ids=qids, key_query_ids=kqids,
                                num_columns=8, block_size=block)
    assert (got[0] - unbiased[0]).abs().max() > 0.1  # the bias does act
    finite = torch.isfinite(want[1])
    assert torch.autograd.gradcheck(lambda q, k, s: (lambda r, c: (r, c[finite]))(*fn(q, k, s)), (q, k, s))


def _ceiling(q, k, targets, first):
    """Ceilings halfway between each row's positive and its best key from ``first`` on: some
    keys of every row are over, some under."""
    dots = (q @ k.T).detach().double()
    return 0.5 * (dots[torch.arange(q.shape[0]), targets] + dots[:, first:].max(1).values)


@pytest.mark.parametrize("mode", ["sparse", "dense", "device"])
@pytest.mark.parametrize("block", [3, 64])
def test_score_ceiling_matches_dense_reference_and_gradcheck(monkeypatch, mode, block):
    """Ceiling on the row-only keys from 9 on, with the id masks and both biases: the
    definition, fp64 gradcheck (the mask is the same in both passes), keys before ``first``
    never left out; CPU sparse and dense masks and the GPU path."""
    import clicktower.kernels.pair_masks as PM

    if mode == "dense":
        monkeypatch.setattr(PM, "_SPARSE_PAIRS_PER_ROW", 0)
    if mode == "device":
        _device(monkeypatch)
    q, k, s, targets, key_ids, qids, kqids, kb, qb = _case()
    ceiling = _ceiling(q, k, targets, 9)
    over = ((q @ k.T).detach() > ceiling[:, None])[:, 9:]
    assert over.any() and not over.all()
    fn = lambda q, k, s: paired_logsumexp(q, k, s, targets=targets, key_ids=key_ids, query_ids=qids,
                                          key_query_ids=kqids, num_columns=8, block_size=block,
                                          key_bias=kb, query_bias=qb, score_ceiling=(ceiling, 9))
    got = fn(q, k, s)
    want = ref_biased(q, k, s, targets, key_ids, qids, kqids, 8, kb, qb, ceiling=(ceiling, 9))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # A ceiling below every key from 8 on leaves them out of the rows; keys 0-7 (and key 8,
    # before first) stay: the same as the call on the first 9 keys.
    low = paired_logsumexp(q, k, s, targets=targets, num_columns=8, block_size=block,
                           score_ceiling=(torch.full((6,), -1e9, dtype=torch.float64), 9))
    short = paired_logsumexp(q, k[:9], s, targets=targets, num_columns=8, block_size=block)
    torch.testing.assert_close(low[0], short[0])
    torch.testing.assert_close(low[1], short[1])
    finite = torch.isfinite(want[1])
    assert torch.autograd.gradcheck(lambda q, k, s: (lambda r, c: (r, c[finite]))(*fn(q, k, s)), (q, k, s))


def test_score_ceiling_validation():
    q, k, s, *_ = _case()
    with pytest.raises(ValueError, match="first key must lie"):
        paired_logsumexp(q, k, s, targets=torch.arange(6), num_columns=6, score_ceiling=(torch.zeros(6), 4))
    with pytest.raises(ValueError, match="ceiling must be a float tensor"):
        paired_logsumexp(q, k, s, targets=torch.arange(6), score_ceiling=(torch.zeros(5), 8))
    with pytest.raises(ValueError, match="a pair"):
        paired_logsumexp(q, k, s, targets=torch.arange(6), score_ceiling=torch.zeros(6))


def test_positive_is_not_corrected():
    """Only the positive's own bias changes nothing; every other key's bias does."""
    q, k, s, *_ = _case()
    targets = torch.arange(6)
    bias = torch.zeros(11, dtype=torch.float64)
    bias[3] = 5.0  # key 3 is row 3's positive and a negative of every other row
    r, _ = paired_logsumexp(q, k, s, targets=targets, key_bias=bias)
    r0, _ = paired_logsumexp(q, k, s, targets=targets)
    assert torch.equal(r[3], r0[3])
    assert (r[torch.arange(6) != 3] > r0[torch.arange(6) != 3]).all()


def test_corrected_infonce_loss_equals_cross_entropy_of_biased_logits():
    """The loss built from the kernel (lse - positive) is F.cross_entropy of the logits with
    -log q_j added to every negative, in fp32, values and gradients."""
    g = torch.Generator().manual_seed(8)
    B, N = 24, 40
    q = F.normalize(torch.randn(B, 16, generator=g), dim=1).requires_grad_()
    k = F.normalize(torch.randn(N, 16, generator=g), dim=1).requires_grad_()
    s = torch.tensor(20.0, requires_grad=True)
    log_q = torch.log(torch.distributions.Dirichlet(torch.ones(N)).sample((1,))[0] * N)
    targets = torch.randperm(N, generator=g)[:B]

    def fused(q, k, s):
        r, _ = paired_logsumexp(q, k, s, targets=targets, block_size=7, key_bias=-log_q)
        return (r - s * (q * k[targets]).sum(1)).mean()

    def dense(q, k, s):
        x = s * q @ k.T
        pos = F.one_hot(targets, N).bool()
        return F.cross_entropy(torch.where(pos, x, x - log_q[None, :]), targets)

    out = []
    for fn in (fused, dense):
        loss = fn(q, k, s)
        out.append((loss.detach(),) + torch.autograd.grad(loss, (q, k, s)))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [2.0, 60.0])
def test_fp32_random_shapes_host_and_device(monkeypatch, scale):
    gen = torch.Generator().manual_seed(4)
    for trial in range(4):
        B = int(torch.randint(1, 30, (1,), generator=gen))
        C = B + int(torch.randint(0, 10, (1,), generator=gen))
        N = C + int(torch.randint(0, 10, (1,), generator=gen))
        block = int(torch.randint(1, 20, (1,), generator=gen))
        q = F.normalize(torch.randn(B, 8, generator=gen), dim=1).requires_grad_()
        k = F.normalize(torch.randn(N, 8, generator=gen), dim=1).requires_grad_()
        s = torch.tensor(scale, requires_grad=True)
        targets = torch.randperm(C, generator=gen)[:B]
        key_ids = torch.randint(-1, max(2, N // 3), (N,), generator=gen)
        kb, qb = torch.randn(N, generator=gen) * 3, torch.randn(B, generator=gen) * 3

        def loss(fn, q, k, s):
            r, c = fn(q, k, s)
            return r.sum() + torch.where(torch.isfinite(c), c, torch.zeros_like(c)).sum()

        fused = lambda q, k, s: paired_logsumexp(q, k, s, targets=targets, key_ids=key_ids, num_columns=C,
                                                 block_size=block, key_bias=kb, query_bias=qb)
        dense = lambda q, k, s: ref_biased(q, k, s, targets, key_ids, columns=C, key_bias=kb, query_bias=qb)
        qd, kd, sd = (t.detach().double().requires_grad_() for t in (q, k, s))
        want = torch.autograd.grad(loss(dense, qd, kd, sd), (qd, kd, sd))
        for device in (False, True):
            with monkeypatch.context() as m:
                if device:
                    _device(m)
                got = torch.autograd.grad(loss(fused, q, k, s), (q, k, s))
            for a, b in zip(got, want):
                torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_bias_validation():
    q, k, s, *_ = _case()
    with pytest.raises(ValueError, match="key_bias"):
        paired_logsumexp(q, k, s, targets=torch.arange(6), key_bias=torch.zeros(3))
    with pytest.raises(ValueError, match="query_bias"):
        paired_logsumexp(q, k, s, targets=torch.arange(6), query_bias=torch.zeros(6, dtype=torch.int64))


def test_biased_call_reads_the_host_once_per_pass_in_device_mode(monkeypatch):
    """The biases' span joins the forward's one host read; the backward keeps its one (GPU
    behaviour forced on the CPU, many tiles)."""
    from test_kernels import _count_host_reads

    _device(monkeypatch)
    q, k, s, targets, key_ids, qids, kqids, kb, qb = _case(dtype=torch.float32)
    reads = _count_host_reads(monkeypatch)
    ceiling = _ceiling(q, k, targets, 9)  # the score ceiling adds no host read either
    r, c = paired_logsumexp(q, k, s, targets=targets, key_ids=key_ids, query_ids=qids, key_query_ids=kqids,
                            num_columns=8, block_size=2, key_bias=kb, query_bias=qb, score_ceiling=(ceiling, 9))
    forward_reads = reads["n"]
    (r.sum() + torch.where(torch.isfinite(c), c, torch.zeros_like(c)).sum()).backward()
    backward_reads = reads["n"] - forward_reads
    monkeypatch.undo()
    assert forward_reads <= 1 and backward_reads <= 1, (forward_reads, backward_reads)
    want = ref_biased(q.detach().double(), k.detach().double(), s.detach().double(), targets, key_ids, qids,
                      kqids, 8, kb, qb, ceiling=(ceiling, 9))
    torch.testing.assert_close(r.detach().double(), want[0], rtol=1e-5, atol=1e-5)
