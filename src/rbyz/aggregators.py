"""rbyz.aggregators (under construction)."""
