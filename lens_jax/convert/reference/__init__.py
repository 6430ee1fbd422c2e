"""PyTorch references used by `lens_jax.convert.verify` and the tests (they need torch)."""
