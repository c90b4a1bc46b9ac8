"""clicktower.data."""
