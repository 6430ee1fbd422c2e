"""lens_jax: the Lens text-to-image MMDiT in JAX / Flax NNX."""

__version__ = "0.1.0"
