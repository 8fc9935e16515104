"""rbyz.attacks (under construction)."""
