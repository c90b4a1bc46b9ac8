"""The loss levers of issue 28 across 2 gloo ranks: logQ (streaming) and the cross-batch
memory give the one-process result of the global batch, and every rank holds the same state."""
import pytest
import torch

from clicktower.modeling.losses import ContrastiveLoss
from dist_harness import run_ranks
from levers_ref import HN_SIZES, SIZES, levers_config, levers_steps, levers_worker

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("symmetric,gather", [(False, False), (True, False), (True, True)])
def test_two_ranks_match_one_process_and_share_state(symmetric, gather):
    """2 gloo ranks (uneven batches, hard negatives, exclusions), three steps of streaming
    logQ + memory: the mean of the ranks' losses is the one-process loss of the global batch,
    each rank's gradients are W x that loss's for its rows, and both ranks end with the
    one-process memory and estimator state."""
    results = run_ranks(levers_worker, 2, symmetric, gather)
    single = ContrastiveLoss.from_config(levers_config(symmetric, gather))
    want = levers_steps(single, 0, 1)
    for step, ref in enumerate(want):
        got = [r["steps"][step] for r in results]
        torch.testing.assert_close(0.5 * (got[0][0] + got[1][0]), ref[0])
        for i, sizes in ((1, SIZES), (2, SIZES), (3, HN_SIZES)):
            torch.testing.assert_close(torch.cat([got[0][i], got[1][i]]), 2 * ref[i], msg=f"step {step} grad {i}")
    state = single.state.state_dict()
    for r in results:
        assert torch.equal(r["state"]["memory"]["emb"], state["memory"]["emb"])
        assert torch.equal(r["state"]["memory"]["item_ids"], state["memory"]["item_ids"])
        assert torch.equal(r["state"]["popularity_items"]["gap"], state["popularity_items"]["gap"])
        assert torch.equal(r["state"]["popularity_queries"]["last"], state["popularity_queries"]["last"])
