"""Building blocks shared by every model: annotated parameters, dense layers, RMSNorm, attention.

Parameters are float32 "master" weights annotated with logical axis names (see
`lens_jax/parallel/rules.py`); each layer casts them to its compute `dtype` at use, so a bf16 model
keeps float32 weights and optimizer state without a separate copy.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Shape = Sequence[int]
Axes = Sequence[str | None]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name) -> jnp.dtype:
    if not isinstance(name, str):
        return jnp.dtype(name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def param(rngs: nnx.Rngs | None, init: Callable, shape: Shape, axes: Axes, dtype=jnp.float32) -> nnx.Param:
    """A Param carrying its logical axes; sharding is applied later by the rules, never eagerly."""
    if len(axes) != len(shape):
        raise ValueError(f"parameter of shape {tuple(shape)} given {len(axes)} logical axes {tuple(axes)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


def fan_in_init(fan_in: int):
    """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), torch.nn.Linear's default."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def zeros_init(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def ones_init(key, shape, dtype):
    return jnp.ones(shape, dtype)


class Dense(nnx.Module):
    """y = x . W + b, contracting the last len(in_shape) axes of x.

    The kernel has shape in_shape + out_shape (a torch Linear weight [out, in] transposed, then
    reshaped), so fused projections can keep a heads axis that the rules can shard.
    """

    def __init__(
        self,
        in_shape: int | Shape,
        out_shape: int | Shape,
        *,
        in_axes: Axes,
        out_axes: Axes,
        use_bias: bool = True,
        dtype="float32",
        kernel_init: Callable | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        self.in_shape, self.out_shape = in_shape, out_shape
        self.dtype = dtype_of(dtype)
        fan_in = math.prod(in_shape)
        init = kernel_init or fan_in_init(fan_in)
        self.kernel = param(rngs, init, in_shape + out_shape, tuple(in_axes) + tuple(out_axes))
        self.bias = param(rngs, fan_in_init(fan_in), out_shape, tuple(out_axes)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        kernel = self.kernel[...].astype(self.dtype)
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            kernel,
            ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32 with a learned float32 weight, cast back to the compute dtype."""

    def __init__(self, dim: int, *, eps: float, axis_name: str | None = "norm", dtype="float32", rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.dtype = dtype_of(dtype)
        self.weight = param(rngs, ones_init, (dim,), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * y).astype(self.dtype)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters, in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Non-causal multi-head attention with a key-side padding mask: the one entry point.

    q [B, Tq, H, D], k/v [B, Tk, H, D], key_mask [B, Tk] bool (True = attend). Masked keys get
    an additive -inf, so they contribute exactly zero. Implementations:
      - "xla": einsum + float32 softmax; any mask; runs everywhere (and is the parity reference).
      - "cudnn": fused flash attention on NVIDIA GPUs (bf16/fp16); the mask must be a prefix of
        valid keys per row (true for the MMDiT's [image; right-padded text] sequence).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if implementation == "xla":
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
        if key_mask is not None:
            scores = jnp.where(key_mask[:, None, None, :], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    if implementation == "cudnn":
        lengths = None if key_mask is None else jnp.sum(key_mask.astype(jnp.int32), axis=-1)
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, key_value_seq_lengths=lengths, implementation="cudnn"
        )
    raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")
