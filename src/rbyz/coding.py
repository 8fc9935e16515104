"""rbyz.coding (under construction)."""
