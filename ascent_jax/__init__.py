"""ascent_jax: machine-unlearning research at ensemble scale in JAX."""
