"""clicktower.launcher."""
