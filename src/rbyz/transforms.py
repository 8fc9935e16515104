"""rbyz.transforms (under construction)."""
