"""Runnable studies built on the ascent_jax library."""
