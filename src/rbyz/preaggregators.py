"""rbyz.preaggregators (under construction)."""
