"""Benchmarks: `python -m lens_jax.bench train|...` (speed and memory are measured here, never in tests)."""
