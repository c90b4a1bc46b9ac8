"""clicktower.kernels."""
