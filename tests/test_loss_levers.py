"""The loss levers of issue 28 in one process: the logQ popularity correction and the
cross-batch memory (XBM) against a dense reference, the false-negative rules on memory
entries, warm-up, FIFO bound, the streaming estimator, and an exact resume of their state."""
import io
import math

import pytest
import torch

from clicktower.kernels.labels import PairLabels
from clicktower.modeling.levers import CountTable, CrossBatchMemory, StreamingFrequency
from clicktower.modeling.losses import ContrastiveLoss, LossConfig
from levers_ref import COUNT_ITEMS, COUNT_QUERIES, levers_batch, levers_reference

pytestmark = pytest.mark.unit


def _loss(symmetric=True, popularity=True, memory=0, warmup=0, block=3, gather_queries=False):
    pop = (CountTable(*COUNT_ITEMS), CountTable(*COUNT_QUERIES)) if popularity else None
    mem = CrossBatchMemory(memory, warmup) if memory else None
    return ContrastiveLoss(symmetric, gather_queries=gather_queries, block_size=block, popularity=pop, memory=mem)


def _labels(b, exclude=True):
    return PairLabels(item_ids=b["item_ids"], query_ids=b["query_ids"], hard_negative_ids=b["hn_ids"],
                      exclude_ids=b["exclude"] if exclude else None)


def _leaves(b):
    return [b[name].clone().requires_grad_() for name in ("q", "k", "h")] + [torch.tensor(4.0, dtype=torch.float64,
                                                                                        requires_grad=True)]


def _value_and_grads(fn, leaves):
    loss = fn(*leaves)
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("popularity", [False, True])
@pytest.mark.parametrize("with_memory", [False, True])
def test_loss_with_levers_matches_dense_reference(symmetric, popularity, with_memory):
    """Values and gradients (queries, items, hard negatives, scale) of the fused loss with the
    correction and/or memory entries equal the corrected InfoNCE written out densely."""
    b = levers_batch()
    loss_fn = _loss(symmetric, popularity, memory=5 if with_memory else 0)
    if with_memory:
        loss_fn.memory.push(b["mem"], b["mem_item_ids"], b["mem_query_ids"])
    mem = (b["mem"], b["mem_item_ids"], b["mem_query_ids"]) if with_memory else None
    logp = (CountTable(*COUNT_ITEMS).log_probability, CountTable(*COUNT_QUERIES).log_probability) if popularity \
        else (None, None)
    got = _value_and_grads(lambda q, k, h, s: loss_fn(q, k, s, _labels(b), h), _leaves(b))
    want = _value_and_grads(lambda q, k, h, s: levers_reference(
        q, k, s, b["item_ids"], b["query_ids"], h=h, hn_ids=b["hn_ids"], mem=mem, item_logp=logp[0],
        query_logp=logp[1], symmetric=symmetric, exclude=b["exclude"]), _leaves(b))
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w)
    plain = _value_and_grads(lambda q, k, h, s: _loss(symmetric, False)(q, k, s, _labels(b), h), _leaves(b))
    if popularity or with_memory:
        assert abs(float(got[0] - plain[0])) > 1e-3  # the levers do change the loss


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_memory_filter_matches_dense_reference(symmetric, margin):
    """``memory_filter_margin``: memory entries scoring above (1 - m) x the row's positive
    leave that row's denominator (some, not all, in this batch), with logQ and the id rules on;
    values and gradients equal the dense reference, and the filter changes the loss."""
    b = levers_batch()
    ceiling = (1 - margin) * (b["q"] * b["k"]).sum(1)
    dropped = int((b["q"] @ b["mem"].T > ceiling[:, None]).sum())
    assert 0 < dropped < b["mem"].shape[0] * b["q"].shape[0]

    def fused(margin_or_none):
        loss_fn = ContrastiveLoss(symmetric, block_size=3, memory=CrossBatchMemory(5, 0),
                                  popularity=(CountTable(*COUNT_ITEMS), CountTable(*COUNT_QUERIES)),
                                  memory_filter_margin=margin_or_none)
        loss_fn.memory.push(b["mem"], b["mem_item_ids"], b["mem_query_ids"])
        return _value_and_grads(lambda q, k, h, s: loss_fn(q, k, s, _labels(b), h), _leaves(b))

    logp = CountTable(*COUNT_ITEMS).log_probability, CountTable(*COUNT_QUERIES).log_probability
    want = _value_and_grads(lambda q, k, h, s: levers_reference(
        q, k, s, b["item_ids"], b["query_ids"], h=h, hn_ids=b["hn_ids"], item_logp=logp[0], query_logp=logp[1],
        mem=(b["mem"], b["mem_item_ids"], b["mem_query_ids"]), symmetric=symmetric, exclude=b["exclude"],
        mem_margin=margin), _leaves(b))
    got = fused(margin)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w)
    assert float(got[0]) < float(fused(None)[0]) - 1e-3  # fewer negatives: a smaller loss


def test_memory_filter_applies_to_each_matryoshka_prefix():
    """With Matryoshka prefixes each prefix filters the memory by its own (re-normalised)
    scores: the loss is the weighted sum of the per-prefix filtered losses."""
    b = levers_batch()
    dims, weights = [6, 3], [1.0, 0.5]

    def loss(q, k, h, s):
        loss_fn = ContrastiveLoss(True, block_size=3, memory=CrossBatchMemory(5, 0), memory_filter_margin=0.2,
                                  matryoshka_dims=dims, matryoshka_weights=weights)
        loss_fn.memory.push(b["mem"], b["mem_item_ids"], b["mem_query_ids"])
        return loss_fn(q, k, s, _labels(b), h)

    def prefix(x, d):  # as the loss: the full size as it is, a shorter prefix re-normalised
        return x if d == x.shape[1] else torch.nn.functional.normalize(x[:, :d], dim=-1)

    leaves = _leaves(b)
    got = _value_and_grads(loss, leaves)
    want = _value_and_grads(lambda q, k, h, s: sum(
        w * levers_reference(prefix(q, d), prefix(k, d), s, b["item_ids"], b["query_ids"], h=prefix(h, d),
                             hn_ids=b["hn_ids"], mem=(prefix(b["mem"], d), b["mem_item_ids"], b["mem_query_ids"]),
                             exclude=b["exclude"], mem_margin=0.2)
        for d, w in zip(dims, weights)), leaves)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w)


def test_memory_filter_config_is_checked():
    with pytest.raises(ValueError, match="set loss.memory_size too"):
        LossConfig(memory_filter_margin=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        LossConfig(memory_size=8, memory_filter_margin=1.5)
    with pytest.raises(ValueError, match="needs a memory"):
        ContrastiveLoss(memory_filter_margin=0.1)
    assert ContrastiveLoss.from_config(LossConfig(memory_size=8, memory_filter_margin=0.1)).memory_filter_margin == 0.1


def test_gather_queries_pass_gets_the_query_correction_too():
    b = levers_batch()
    one_pass = _value_and_grads(lambda q, k, h, s: _loss()(q, k, s, _labels(b), h), _leaves(b))
    # One process has no second pass; the config still builds and the result is the same.
    two = _value_and_grads(lambda q, k, h, s: _loss(gather_queries=True)(q, k, s, _labels(b), h), _leaves(b))
    for a, w in zip(one_pass, two):
        torch.testing.assert_close(a, w)


def test_memory_entries_obey_item_query_and_exclusion_masks():
    """Entries that are false negatives of every row (the row's item id, query id, or listed in
    its exclusions) change nothing; one clean entry does."""
    b = levers_batch(n=3)
    b["exclude"] = torch.tensor([[50, -1], [-1, 51], [-1, -1]])
    items, queries = b["item_ids"], b["query_ids"]  # [7, 8, -1], [1, 2, 3]
    # Row 0: entry 0 (item 7); row 1: entry 1 (query 2) and entry 3 (listed 51); row 2: entry 2
    # (query 3). Each entry is a false negative of exactly one row; the rest see it.
    mem_items, mem_queries = torch.tensor([7, 60, 61, 51]), torch.tensor([40, 2, 3, 41])

    def per_row(mem_rows):
        loss_fn = ContrastiveLoss(False, block_size=2, memory=CrossBatchMemory(8, 0))
        if mem_rows:
            idx = torch.tensor(mem_rows)
            loss_fn.memory.push(b["mem"][idx], mem_items[idx], mem_queries[idx])
        out = []
        for row in range(3):  # one-row weights: the loss of that row alone
            w = torch.zeros(3, dtype=torch.float64)
            w[row] = 1
            labels = PairLabels(item_ids=items, query_ids=queries, weights=w, exclude_ids=b["exclude"])
            out.append(float(loss_fn(b["q"], b["k"], torch.tensor(4.0, dtype=torch.float64), labels)))
        return out

    base = per_row([])
    assert per_row([0])[0] == pytest.approx(base[0]) and per_row([0])[1] > base[1] + 1e-6
    assert per_row([1])[1] == pytest.approx(base[1]) and per_row([1])[0] > base[0] + 1e-6
    assert per_row([3])[1] == pytest.approx(base[1]) and per_row([3])[2] > base[2] + 1e-6
    assert per_row([2])[2] == pytest.approx(base[2]) and per_row([2])[0] > base[0] + 1e-6


def test_memory_warmup_fifo_and_no_gradient():
    b = levers_batch()
    loss_fn = _loss(symmetric=False, popularity=False, memory=12, warmup=2)
    plain = _loss(symmetric=False, popularity=False)
    s = torch.tensor(4.0, dtype=torch.float64)
    for step in range(4):
        k = b["k"] + 0.01 * step
        got, want = loss_fn(b["q"], k, s, _labels(b)), plain(b["q"], k, s, _labels(b))
        if step < 2:  # warming up: filled, not used
            assert float(got) == pytest.approx(float(want))
        else:
            assert float(got) > float(want)
        assert loss_fn.memory.emb.shape[0] == min(8 * (step + 1), 12)
        torch.testing.assert_close(loss_fn.memory.emb[:8], k)  # newest first
    assert not loss_fn.memory.emb.requires_grad


def _run(loss_fn, steps, seed=0):
    """Losses and gradients of ``steps`` calls on drifting batches."""
    out = []
    for step in steps:
        b = levers_batch(seed=step)
        leaves = _leaves(b)
        out.append(_value_and_grads(lambda q, k, h, s: loss_fn(q, k, s, _labels(b), h), leaves))
    return out


@pytest.mark.parametrize("source", ["streaming", "counts"])
def test_state_round_trip_resumes_exactly(source):
    """Save the loss state after 3 steps (through torch.save, as the checkpoint does), load it
    into a new loss: steps 4-6 give bit-identical losses and gradients."""
    cfg = LossConfig(popularity_correction="logq", popularity_source=source, popularity_buckets=64,
                     memory_size=10, memory_warmup_steps=1)
    counts = {"items": COUNT_ITEMS, "queries": COUNT_QUERIES}
    full = ContrastiveLoss.from_config(cfg, popularity_counts=counts)
    straight = _run(full, range(6))
    first = ContrastiveLoss.from_config(cfg, popularity_counts=counts)
    _run(first, range(3))
    buf = io.BytesIO()
    torch.save(first.state.state_dict(), buf)
    buf.seek(0)
    resumed = ContrastiveLoss.from_config(cfg, popularity_counts=counts)
    resumed.state.load_state_dict(torch.load(buf, weights_only=True))
    for a, b in zip(_run(resumed, range(3, 6)), straight[3:]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    fresh = _run(ContrastiveLoss.from_config(cfg, popularity_counts=counts), range(3, 6))
    assert not torch.equal(fresh[0][0], straight[3][0])  # the state matters


def test_streaming_estimator_learns_frequencies():
    """Ids drawn with known per-step rates: the estimate of log p is within 0.15 of the truth
    after 3000 steps (alpha 0.01), for frequent and rare ids."""
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    est = StreamingFrequency(buckets=1024, alpha=0.01)
    for _ in range(3000):
        est.observe(torch.multinomial(probs, 16, replacement=True, generator=g))
    got = est.log_probability(torch.arange(5))
    assert (got - probs.double().log()).abs().max() < 0.15, got.exp()
    assert torch.isnan(est.log_probability(torch.tensor([-1]))).all()


def test_count_table_and_bias():
    table = CountTable(torch.tensor([5, 2, 9]), torch.tensor([2, 6, 2]))
    got = table.log_probability(torch.tensor([2, 5, 3, -1]))
    assert got[:3].tolist() == pytest.approx([math.log(0.6), math.log(0.2), math.log(0.1)])  # 3: unseen, count 1
    assert math.isnan(got[3])


def test_config_validation_and_counts_needed():
    with pytest.raises(ValueError, match="popularity_correction"):
        LossConfig(popularity_correction="ips")
    with pytest.raises(ValueError, match="popularity_source"):
        LossConfig(popularity_source="guess")
    with pytest.raises(ValueError, match="memory_size"):
        LossConfig(memory_size=-1)
    with pytest.raises(ValueError, match="counts"):
        ContrastiveLoss.from_config(LossConfig(popularity_correction="logq"))
    assert ContrastiveLoss.from_config(LossConfig()).state is None  # stateless by default



def test_checkpoint_component_saves_and_restores_the_loss_state(tmp_path):
    """Through the real checkpoint component (the loss state registered as ``train`` does):
    load the checkpoint of step 2 after two more steps, and steps 3-4 repeat bit for bit."""
    from accelerate import Accelerator

    from clicktower.launcher.engine.checkpoint import CheckpointConfig, Checkpointer, find_resume_checkpoint

    acc = Accelerator(cpu=True)
    cfg = LossConfig(popularity_correction="logq", popularity_source="streaming", popularity_buckets=64,
                     memory_size=10)
    loss_fn = ContrastiveLoss.from_config(cfg)
    acc.register_for_checkpointing(loss_fn.state)
    ckpt = Checkpointer(acc, tmp_path, CheckpointConfig(), "train: {}\n")
    _run(loss_fn, range(2))
    ckpt.save(2, {"loader": {}})
    first = _run(loss_fn, range(2, 4))
    ckpt.load(find_resume_checkpoint(tmp_path, "auto"))
    again = _run(loss_fn, range(2, 4))
    for a, b in zip(first, again):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert loss_fn.memory.pushes == 4
