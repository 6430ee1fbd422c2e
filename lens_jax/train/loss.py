"""Flow matching on v = eps - x0 with logit-normal sigma (SPEC section 5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sigma_mu(image_tokens: int, loss_cfg) -> float:
    """Logit-normal mean for a resolution: linear in the image token count between two anchors, clamped."""
    lo, hi = float(loss_cfg.low_tokens), float(loss_cfg.high_tokens)
    t = min(max((image_tokens - lo) / (hi - lo), 0.0), 1.0) if hi > lo else 0.0
    return float(loss_cfg.mu_at_low) + t * (float(loss_cfg.mu_at_high) - float(loss_cfg.mu_at_low))


def sample_sigma(key: jax.Array, batch: int, mu: float, std: float) -> jax.Array:
    return jax.nn.sigmoid(mu + std * jax.random.normal(key, (batch,), jnp.float32))


def noisy_input(x0: jax.Array, eps: jax.Array, sigma: jax.Array):
    """(x_t, target v)."""
    s = sigma[:, None, None, None]
    return (1.0 - s) * x0 + s * eps, eps - x0


def weighted_mse(pred: jax.Array, target: jax.Array, weight: jax.Array):
    """Mean squared error per example, averaged with weights (0 = skipped record). Returns (sum, weight sum)."""
    per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2, 3))
    return jnp.sum(per_example * weight), jnp.sum(weight)
