"""The fused losses' extra memory is linear in the batch, not quadratic.

Each measurement runs in a fresh subprocess (tests/support/kernel_mem_probe.py) and reports the
increase of peak RSS over the RSS after imports and input allocation.
"""
import json
import subprocess
import sys

import pytest

from conftest import SUPPORT

pytestmark = pytest.mark.unit

PROBE = SUPPORT / "kernel_mem_probe.py"
D, BLOCK = 16, 512


def _peak(method, B):
    out = subprocess.run([sys.executable, str(PROBE), method, str(B), str(D), str(BLOCK)],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_increase_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fused", "fused_sym", "loss_sym"])
def test_peak_memory_grows_linearly_with_batch(method):
    small, large = 4096, 16384
    p_small, p_large = _peak(method, small), _peak(method, large)
    naive_logits_large = large * large * 4  # one fp32 [B, N] logits matrix: 1 GiB
    # Linear: 4x the batch -> ~4x the memory (quadratic would be 16x).
    assert p_large < 6 * max(p_small, 1 << 20), (p_small, p_large)
    # The naive path needs several B x N matrices; the fused one not even a quarter of one.
    assert p_large < naive_logits_large / 4, (p_large, naive_logits_large)
    # And the documented bound: O((B + N) * D + block^2) -- a generous constant of 16 fp32
    # [B, D] arrays, two tiles, plus 16 MiB of allocator/runtime slack.
    bound = 16 * 2 * large * D * 4 + 2 * BLOCK * BLOCK * 4 + (16 << 20)
    assert p_large < bound, (p_large, bound)


def test_naive_reference_is_quadratic():
    # Sanity of the measurement itself: the materialised loss at B = 4096 already holds
    # several 64 MiB [B, N] matrices.
    assert _peak("naive", 4096) > 2 * 4096 * 4096 * 4
