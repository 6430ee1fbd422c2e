"""Three-axis (frame, row, col) rotary position embedding of the Lens DiT.

Image token (i, j) of an h x w grid sits at (0, i - (h - h//2), j - (w - w//2)), so positions are
centred on the grid; text token t sits at max(h//2, w//2) + t on all three axes, after every image
position. Each axis owns `axes_dims[a]` of the head dims and rotates adjacent (interleaved) pairs.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


def joint_positions(h: int, w: int, num_text: int) -> np.ndarray:
    """Integer positions [h*w + num_text, 3] of the joint sequence [image tokens; text tokens]."""
    rows = np.arange(h) - (h - h // 2)
    cols = np.arange(w) - (w - w // 2)
    img = np.zeros((h, w, 3), np.int64)
    img[..., 1] = rows[:, None]
    img[..., 2] = cols[None, :]
    txt = np.repeat((max(h // 2, w // 2) + np.arange(num_text))[:, None], 3, axis=1)
    return np.concatenate([img.reshape(h * w, 3), txt], axis=0)


def rope_angles(positions: np.ndarray, axes_dims: Sequence[int], theta: float = 10000.0) -> np.ndarray:
    """Rotation angles [N, sum(axes_dims)/2]: per axis, pos * theta^(-2k/d_axis), axes in order."""
    parts = []
    for axis, dim in enumerate(axes_dims):
        if dim % 2:
            raise ValueError(f"axes_dims_rope entries must be even, got {tuple(axes_dims)}")
        inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        parts.append(positions[:, axis : axis + 1].astype(np.float64) * inv_freq[None, :])
    return np.concatenate(parts, axis=1)


def rope_tables(h: int, w: int, num_text: int, axes_dims: Sequence[int], theta: float = 10000.0):
    """(cos, sin), each float32 [h*w + num_text, head_dim/2]; static per shape, so built with numpy."""
    ang = rope_angles(joint_positions(h, w, num_text), axes_dims, theta)
    return jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, N, H, D] by the angles of each token."""
    b, n, heads, d = x.shape
    pairs = x.astype(jnp.float32).reshape(b, n, heads, d // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(b, n, heads, d).astype(x.dtype)
