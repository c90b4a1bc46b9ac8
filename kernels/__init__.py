"""clicktower.kernels: fused, memory-lean loss kernels (plain PyTorch, CPU and CUDA)."""
from .collectives import all_reduce_sum, distributed_world, gather_sizes, gather_with_grad
from .contrastive import (
    DEFAULT_BLOCK_SIZE,
    contrastive_logsumexp,
    fused_contrastive_loss,
    fused_symmetric_contrastive_loss,
    paired_logsumexp,
    positive_logits,
    symmetric_logsumexp,
)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "all_reduce_sum",
    "distributed_world",
    "gather_sizes",
    "gather_with_grad",
    "contrastive_logsumexp",
    "fused_contrastive_loss",
    "fused_symmetric_contrastive_loss",
    "paired_logsumexp",
    "positive_logits",
    "symmetric_logsumexp",
]
