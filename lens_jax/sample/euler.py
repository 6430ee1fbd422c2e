"""Euler sampling of the flow x_t = (1 - sigma) x0 + sigma eps, v = eps - x0, with CFG in one batch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def cfg_combine(cond: jax.Array, uncond: jax.Array, guidance) -> jax.Array:
    """u + g (c - u), then rescaled per token to the norm of c (norm over channels; 1 where the norm is 0)."""
    comb = uncond + guidance * (cond - uncond)
    c_norm = jnp.linalg.norm(cond.astype(jnp.float32), axis=-1, keepdims=True)
    comb_norm = jnp.linalg.norm(comb.astype(jnp.float32), axis=-1, keepdims=True)
    factor = jnp.where(comb_norm > 0, c_norm / jnp.where(comb_norm > 0, comb_norm, 1.0), 1.0)
    return (comb.astype(jnp.float32) * factor).astype(comb.dtype)


def initial_noise(key: jax.Array, batch: int, h: int, w: int, channels: int) -> jax.Array:
    """Noise drawn as tokens [B, h*w, C] (as upstream), returned as a grid [B, h, w, C]."""
    return jax.random.normal(key, (batch, h * w, channels), jnp.float32).reshape(batch, h, w, channels)


@functools.partial(jax.jit, static_argnames=("dit_graphdef", "use_cfg"))
def euler_sample(dit_graphdef, dit_state, noise, sigmas, text_hidden, text_mask, neg_hidden, neg_mask, guidance,
                 *, use_cfg: bool):
    """The whole denoising loop as one compiled function: N model calls (2N rows with CFG)."""
    model = nnx.merge(dit_graphdef, dit_state)
    b = noise.shape[0]
    if use_cfg:
        hidden = jnp.concatenate([text_hidden, neg_hidden], axis=0)
        mask = jnp.concatenate([text_mask, neg_mask], axis=0)
    else:
        hidden, mask = text_hidden, text_mask

    def step(i, x):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if use_cfg:
            v = model(jnp.concatenate([x, x], axis=0), jnp.full((2 * b,), sigma), hidden, mask)
            v = cfg_combine(v[:b], v[b:], guidance)
        else:
            v = model(x, jnp.full((b,), sigma), hidden, mask)
        return (x + (sigma_next - sigma) * v.astype(jnp.float32)).astype(x.dtype)

    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, step, noise)
