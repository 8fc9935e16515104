"""rbyz.distributed (under construction)."""
