"""The Lens DiT: a dual-stream MMDiT (every block double-stream, joint attention), SPEC section 1.

Public call: `velocity = dit(x [B,h,w,Cin], sigma [B], text_hidden [B,T,L,D], text_mask [B,T])`.

NNX parameter paths and the official (PyTorch) keys they hold; a torch Linear weight [out, in]
becomes a kernel [in, out], reshaped where a heads axis is kept:

  time_linear_1 / time_linear_2   time_text_embed.timestep_embedder.linear_{1,2}
  txt_norm [L, D]                 txt_norm.{0..L-1}.weight (stacked)
  txt_in.kernel [L, D, d]         txt_in.weight [d, L*D] (.T, reshape)
  img_in, norm_out_linear, proj_out    img_in, norm_out.linear, proj_out
  blocks.* (leading axis = layer i)    transformer_blocks.{i}.*:
    img_qkv / txt_qkv kernel [d, 3, H, Dh]   attn.img_qkv / attn.txt_qkv weight [3*H*Dh, d] (.T, reshape)
    img_out / txt_out kernel [H, Dh, d]      attn.to_out.0 / attn.to_add_out weight [d, H*Dh] (.T, reshape)
    norm_q, norm_k, norm_added_q, norm_added_k   attn.norm_{q,k,added_q,added_k}
    img_mod / txt_mod                        {img,txt}_mod.1
    img_norm1 .. txt_norm2                   {img,txt}_norm{1,2}
    img_mlp.w1 .. txt_mlp.w3                 {img,txt}_mlp.w{1,2,3}
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from lens_jax.models import layers
from lens_jax.models.layers import Dense, RMSNorm
from lens_jax.models.rope import apply_rope, rope_tables
from lens_jax.parallel.rules import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Sizes of a Lens DiT. Field names follow the official `transformer/config.json`."""

    num_layers: int = 48
    num_attention_heads: int = 24
    attention_head_dim: int = 64
    in_channels: int = 128
    out_channels: int = 128  # the actual proj_out width (the official config's nominal 32 means 32 x 2x2)
    enc_hidden_dim: int = 2880
    num_text_layers: int = 4
    axes_dims_rope: tuple = (8, 28, 28)
    rope_theta: float = 10000.0
    mlp_hidden_dim: int = 0  # 0: int(inner * 8 / 3), as upstream
    timestep_dim: int = 256
    dtype: str = "float32"  # compute dtype; parameters stay float32
    attention_impl: str = "xla"
    remat: str = "none"
    init: str = "adaln_zero"  # or "fan_in": every Linear torch-default (used by parity tests)

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"model.axes_dims_rope {tuple(self.axes_dims_rope)} must sum to attention_head_dim {self.attention_head_dim}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        if self.attention_impl not in layers.ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"model.attention_impl={self.attention_impl!r}; expected one of {layers.ATTENTION_IMPLEMENTATIONS}")
        if self.init not in ("adaln_zero", "fan_in"):
            raise ValueError(f"model.init={self.init!r}; expected 'adaln_zero' or 'fan_in'")
        layers.dtype_of(self.dtype)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_dim(self) -> int:
        return self.mlp_hidden_dim or int(self.inner_dim * 8 / 3)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DiTConfig":
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}; known: {sorted(names)}")
        if "axes_dims_rope" in d:
            d["axes_dims_rope"] = tuple(int(a) for a in d["axes_dims_rope"])
        return cls(**d)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["axes_dims_rope"] = list(self.axes_dims_rope)
        return out


def dit_param_count(cfg: DiTConfig) -> int:
    """Analytic parameter count (checked against the module in tests)."""
    d, m, hd = cfg.inner_dim, cfg.mlp_dim, cfg.attention_head_dim
    per_stream = (d * 3 * d + 3 * d) + (d * d + d) + (d * 6 * d + 6 * d) + 2 * d + 3 * d * m
    block = 2 * per_stream + 4 * hd
    top = (
        (cfg.timestep_dim * d + d) + (d * d + d)
        + cfg.num_text_layers * cfg.enc_hidden_dim
        + (cfg.num_text_layers * cfg.enc_hidden_dim * d + d)
        + (cfg.in_channels * d + d)
        + (d * 2 * d + 2 * d)
        + (d * cfg.out_channels + cfg.out_channels)
    )
    return cfg.num_layers * block + top


def timestep_embedding(sigma: jax.Array, dim: int, dtype) -> jax.Array:
    """[cos, sin] sinusoid of 1000 * sigma; sigma is first cast to the model dtype, as upstream."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    arg = (sigma.astype(dtype).astype(jnp.float32)[:, None] * freqs[None, :]) * 1000.0
    return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


class SwiGLU(nnx.Module):
    def __init__(self, d: int, hidden: int, *, dtype, rngs):
        kw = dict(use_bias=False, dtype=dtype, rngs=rngs)
        self.w1 = Dense(d, hidden, in_axes=("embed",), out_axes=("mlp",), **kw)
        self.w3 = Dense(d, hidden, in_axes=("embed",), out_axes=("mlp",), **kw)
        self.w2 = Dense(hidden, d, in_axes=("mlp",), out_axes=("embed",), **kw)

    def __call__(self, x):
        h = jax.nn.silu(self.w1(x)) * self.w3(x)
        return self.w2(constrain(h, ("act_batch", "act_length", "act_mlp")))


class DoubleStreamBlock(nnx.Module):
    """Separate image and text weights; one joint softmax attention over [image; text]."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d, h, hd, dt = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.dtype
        self.attention_impl = cfg.attention_impl
        mod_init = layers.zeros_init if cfg.init == "adaln_zero" else None
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Dense(d, 6 * d, in_axes=("embed",), out_axes=("mod",), dtype=dt,
                                            kernel_init=mod_init, rngs=rngs))
            setattr(self, f"{s}_norm1", RMSNorm(d, eps=1e-6, dtype=dt, rngs=rngs))
            setattr(self, f"{s}_norm2", RMSNorm(d, eps=1e-6, dtype=dt, rngs=rngs))
            setattr(self, f"{s}_qkv", Dense(d, (3, h, hd), in_axes=("embed",), out_axes=("qkv", "heads", "head_dim"),
                                            dtype=dt, rngs=rngs))
            setattr(self, f"{s}_out", Dense((h, hd), d, in_axes=("heads", "head_dim"), out_axes=("embed",),
                                            dtype=dt, rngs=rngs))
            setattr(self, f"{s}_mlp", SwiGLU(d, cfg.mlp_dim, dtype=dt, rngs=rngs))
        self.norm_q = RMSNorm(hd, eps=1e-6, dtype=dt, rngs=rngs)
        self.norm_k = RMSNorm(hd, eps=1e-6, dtype=dt, rngs=rngs)
        self.norm_added_q = RMSNorm(hd, eps=1e-6, dtype=dt, rngs=rngs)
        self.norm_added_k = RMSNorm(hd, eps=1e-6, dtype=dt, rngs=rngs)

    def __call__(self, img, txt, temb_act, cos, sin, key_mask):
        n_img = img.shape[1]
        img_mod = jnp.split(self.img_mod(temb_act)[:, None, :], 6, axis=-1)
        txt_mod = jnp.split(self.txt_mod(temb_act)[:, None, :], 6, axis=-1)

        def modulate(x, shift, scale):
            return x * (1 + scale) + shift

        img_qkv = self.img_qkv(modulate(self.img_norm1(img), img_mod[0], img_mod[1]))
        txt_qkv = self.txt_qkv(modulate(self.txt_norm1(txt), txt_mod[0], txt_mod[1]))
        q = jnp.concatenate([self.norm_q(img_qkv[:, :, 0]), self.norm_added_q(txt_qkv[:, :, 0])], axis=1)
        k = jnp.concatenate([self.norm_k(img_qkv[:, :, 1]), self.norm_added_k(txt_qkv[:, :, 1])], axis=1)
        v = jnp.concatenate([img_qkv[:, :, 2], txt_qkv[:, :, 2]], axis=1)
        heads = ("act_batch", "act_length", "act_heads", None)
        q, k, v = (constrain(t, heads) for t in (apply_rope(q, cos, sin), apply_rope(k, cos, sin), v))
        o = layers.attention(q, k, v, key_mask, scale=q.shape[-1] ** -0.5, implementation=self.attention_impl)
        o = constrain(o, heads)

        img = img + img_mod[2] * self.img_out(o[:, :n_img])
        txt = txt + txt_mod[2] * self.txt_out(o[:, n_img:])
        img = img + img_mod[5] * self.img_mlp(modulate(self.img_norm2(img), img_mod[3], img_mod[4]))
        txt = txt + txt_mod[5] * self.txt_mlp(modulate(self.txt_norm2(txt), txt_mod[3], txt_mod[4]))
        act = ("act_batch", "act_length", "act_embed")
        return constrain(img, act), constrain(txt, act)


class LensDiT(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, dt = cfg.inner_dim, cfg.dtype
        zero = layers.zeros_init if cfg.init == "adaln_zero" else None
        self.time_linear_1 = Dense(cfg.timestep_dim, d, in_axes=("freq",), out_axes=("embed",), dtype=dt, rngs=rngs)
        self.time_linear_2 = Dense(d, d, in_axes=("embed",), out_axes=("embed",), dtype=dt, rngs=rngs)
        self.txt_norm = layers.param(rngs, layers.ones_init, (cfg.num_text_layers, cfg.enc_hidden_dim), (None, "norm"))
        self.txt_in = Dense((cfg.num_text_layers, cfg.enc_hidden_dim), d, in_axes=(None, "text_embed"),
                            out_axes=("embed",), dtype=dt, rngs=rngs)
        self.img_in = Dense(cfg.in_channels, d, in_axes=("in_channels",), out_axes=("embed",), dtype=dt, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r):
            return DoubleStreamBlock(cfg, rngs=r)

        self.blocks = make_blocks(rngs)
        self.norm_out_linear = Dense(d, 2 * d, in_axes=("embed",), out_axes=("mod",), dtype=dt,
                                     kernel_init=zero, rngs=rngs)
        self.proj_out = Dense(d, cfg.out_channels, in_axes=("embed",), out_axes=("in_channels",), dtype=dt,
                              kernel_init=zero, rngs=rngs)

    def embed_text(self, text_hidden: jax.Array) -> jax.Array:
        """Per-layer RMSNorm (eps 1e-5) of the encoder states, then txt_in over all layers at once."""
        x = text_hidden.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5) * self.txt_norm[...]
        return self.txt_in(x)

    def __call__(self, x: jax.Array, sigma: jax.Array, text_hidden: jax.Array, text_mask: jax.Array) -> jax.Array:
        cfg = self.cfg
        dt = layers.dtype_of(cfg.dtype)
        b, h, w, c = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"latents have {c} channels; the DiT expects in_channels={cfg.in_channels}")
        if text_hidden.shape[2:] != (cfg.num_text_layers, cfg.enc_hidden_dim):
            raise ValueError(
                f"text_hidden has shape {text_hidden.shape}; expected [B, T, {cfg.num_text_layers}, {cfg.enc_hidden_dim}]"
            )
        act = ("act_batch", "act_length", "act_embed")
        img = constrain(self.img_in(x.reshape(b, h * w, c)), act)
        txt = constrain(self.embed_text(text_hidden), act)
        temb = self.time_linear_1(timestep_embedding(sigma, cfg.timestep_dim, dt).astype(dt))
        temb = self.time_linear_2(jax.nn.silu(temb))
        temb_act = jax.nn.silu(temb)

        num_text = text_hidden.shape[1]
        cos, sin = rope_tables(h, w, num_text, cfg.axes_dims_rope, cfg.rope_theta)
        key_mask = jnp.concatenate([jnp.ones((b, h * w), bool), text_mask.astype(bool)], axis=1)

        graphdef, stacked = nnx.split(self.blocks)

        def body(carry, layer_state):
            block = nnx.merge(graphdef, layer_state)
            return block(*carry, temb_act, cos, sin, key_mask), None

        policy = REMAT_POLICIES[cfg.remat]
        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        (img, txt), _ = jax.lax.scan(body, (img, txt), stacked)

        scale, shift = jnp.split(self.norm_out_linear(temb_act)[:, None, :], 2, axis=-1)
        img = layers.layer_norm(img, 1e-6) * (1 + scale) + shift
        out = self.proj_out(img)
        return out.reshape(b, h, w, cfg.out_channels)
