"""Helper for tests/test_kernel_memory.py: run one fused loss fwd+bwd in this fresh
process and print the increase of peak RSS over the RSS after imports and inputs.

    python tests/support/kernel_mem_probe.py {fused|fused_sym|loss_sym|naive} B D BLOCK

loss_sym is the training loss (ContrastiveLoss, symmetric, one process) with item and query
ids drawn from a large space, a few of them repeated.
"""
import json
import sys

import torch

from clicktower.kernels import fused_contrastive_loss, fused_symmetric_contrastive_loss
from clicktower.kernels.labels import PairLabels
from clicktower.modeling.losses import ContrastiveLoss


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def main():
    method, B, D, block = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(B, D), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(B, D), dim=1).requires_grad_()
    s = torch.tensor(20.0, requires_grad=True)
    item_ids = torch.randint(0, 1 << 40, (B,))
    query_ids = torch.randint(0, 1 << 40, (B,))
    item_ids[: B // 100] = 7  # one popular product clicked by 1% of the batch
    try:  # reset the peak (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
    except OSError:  # no reset available: the peak so far is the baseline
        base = _status_kib("VmHWM")
    if method == "fused":
        loss = fused_contrastive_loss(q, k, s, block_size=block)
    elif method == "fused_sym":
        loss = fused_symmetric_contrastive_loss(q, k, s, block_size=block)
    elif method == "loss_sym":
        loss = ContrastiveLoss(symmetric=True, cross_device=False, block_size=block)(
            q, k, s, PairLabels(item_ids=item_ids, query_ids=query_ids))
    else:
        loss = torch.nn.functional.cross_entropy(s * q @ k.T, torch.arange(B))
    loss.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    print(json.dumps({"peak_increase_bytes": (_status_kib("VmHWM") - base) * 1024}))


if __name__ == "__main__":
    main()
