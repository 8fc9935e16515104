"""Test configuration: 8 simulated CPU devices and strict numerics, set before any JAX op."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "rbyz",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("rbyz")
