"""clicktower.modeling."""
