"""GPT-OSS (the Lens text encoder) in Flax NNX: the decoder-only MoE transformer up to its last
selected layer, returning raw residual-stream features.

Forward, as transformers' `GptOssModel` computes it (SPEC section 2):
  x = embed_tokens[ids]
  per decoder layer i (even i: sliding-window attention, odd i: full attention):
    h = x + o_proj(attn(rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x))))   n1 = input_layernorm
    x = h + moe(n2(h))                                                                n2 = post_attention_layernorm
  features = [x after layer i for i in selected_layers]     (no final norm; later layers never run)

Parameter table. NNX paths under the encoder. `layers.*` are stacked over the decoder layers on a
leading axis of size num_hidden_layers (logical axis 'layers'): slice i comes from the torch key
`model.layers.{i}.<key>` with <key> as listed. D = hidden_size, H = heads, K = kv_heads,
d = head_dim, E = experts, I = intermediate_size, V = vocab. Every Param carries logical axes.

| NNX path                             | shape         | torch key                                  | transform                 |
|--------------------------------------|---------------|--------------------------------------------|---------------------------|
| embed_tokens                         | [V, D]        | model.embed_tokens.weight                  | none                      |
| layers.input_layernorm.weight        | [L, D]        | input_layernorm.weight                     | none                      |
| layers.q_proj.kernel                 | [L, D, H, d]  | self_attn.q_proj.weight [H*d, D]           | .T.reshape(D, H, d)       |
| layers.q_proj.bias                   | [L, H, d]     | self_attn.q_proj.bias [H*d]                | .reshape(H, d)            |
| layers.k_proj.kernel                 | [L, D, K, d]  | self_attn.k_proj.weight [K*d, D]           | .T.reshape(D, K, d)       |
| layers.k_proj.bias                   | [L, K, d]     | self_attn.k_proj.bias [K*d]                | .reshape(K, d)            |
| layers.v_proj.kernel                 | [L, D, K, d]  | self_attn.v_proj.weight [K*d, D]           | .T.reshape(D, K, d)       |
| layers.v_proj.bias                   | [L, K, d]     | self_attn.v_proj.bias [K*d]                | .reshape(K, d)            |
| layers.o_proj.kernel                 | [L, H, d, D]  | self_attn.o_proj.weight [D, H*d]           | .T.reshape(H, d, D)       |
| layers.o_proj.bias                   | [L, D]        | self_attn.o_proj.bias                      | none                      |
| layers.sinks                         | [L, H]        | self_attn.sinks                            | none                      |
| layers.post_attention_layernorm.weight | [L, D]      | post_attention_layernorm.weight            | none                      |
| layers.router.kernel                 | [L, D, E]     | mlp.router.weight [E, D]                   | .T                        |
| layers.router.bias                   | [L, E]        | mlp.router.bias                            | none                      |
| layers.gate_up_proj                  | [L, E, D, 2I] | mlp.experts.gate_up_proj [E, D, 2I]        | none (gate/up interleaved)|
| layers.gate_up_proj_bias             | [L, E, 2I]    | mlp.experts.gate_up_proj_bias              | none                      |
| layers.down_proj                     | [L, E, I, D]  | mlp.experts.down_proj [E, I, D]            | none                      |
| layers.down_proj_bias                | [L, E, D]     | mlp.experts.down_proj_bias                 | none                      |
| norm.weight                          | [D]           | model.norm.weight                          | none                      |
| lm_head.kernel (include_lm_head)     | [D, V]        | lm_head.weight [V, D]                      | .T                        |

(Layer keys are `model.layers.{i}.input_layernorm.weight`, `model.layers.{i}.self_attn.q_proj.weight`,
`model.layers.{i}.mlp.router.weight`, `model.layers.{i}.mlp.experts.gate_up_proj`, ...; the hub's
MXFP4 `*_blocks`/`*_scales` expert tensors must be dequantised to the [E, in, out] layout first.)

MoE implementations (`moe_impl`), all exact (same routing, same experts, no token dropping):
  - 'ragged': tokens sorted by expert, two `jax.lax.ragged_dot` grouped matmuls. A native grouped
    GEMM on TPU; on NVIDIA GPUs XLA only runs it as a grouped GEMM with the cuDNN fusion
    (`--xla_gpu_experimental_use_ragged_dot_fusion=true`, bf16/f16), otherwise it expands it to a
    dense [E, rows, D] matmul (more work than 'dense'). On CPU JAX also expands it densely.
  - 'blocked' (default): tokens sorted by expert into row blocks of `moe_block_size` (0 = automatic)
    padded per expert; a `lax.scan` over blocks runs each block against its expert's weights. Pure
    XLA, at most (tokens * k + experts * (block - 1)) rows of expert work on every backend.
  - 'dense': every expert on every token, combined with the (sparse) router weights. Reference.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lens_jax.models.layers import DTYPES, Dense, RMSNorm, dtype_of, fan_in_init, param
from lens_jax.parallel.rules import constrain

MOE_IMPLS = ("ragged", "blocked", "dense")
RESIDUAL_AXES = ("act_batch", "act_length", "act_embed")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GptOssConfig:
    """GPT-OSS shape and numerics. Defaults are GPT-OSS-20B (SPEC section 2)."""

    vocab_size: int = 201088
    hidden_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    intermediate_size: int = 2880
    sliding_window: int = 128
    rope_theta: float = 150000.0
    rope_factor: float = 32.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_original_max_position_embeddings: int = 4096
    rope_truncate: bool = False
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    selected_layers: tuple[int, ...] = (5, 11, 17, 23)
    dtype: str = "bfloat16"
    moe_impl: str = "blocked"
    moe_block_size: int = 0  # 'blocked' only: rows per block; 0 = min(128, pow2 >= tokens*k/experts)

    def __post_init__(self):
        object.__setattr__(self, "selected_layers", tuple(int(i) for i in self.selected_layers))
        if self.dtype not in DTYPES:
            raise ValueError(f"GptOssConfig.dtype {self.dtype!r} not in {sorted(DTYPES)}")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"GptOssConfig.moe_impl {self.moe_impl!r} not in {MOE_IMPLS}")
        sel = self.selected_layers
        if not sel:
            raise ValueError("GptOssConfig.selected_layers is empty")
        if any(b <= a for a, b in zip(sel, sel[1:])):
            raise ValueError(f"GptOssConfig.selected_layers {sel} must be strictly increasing")
        if sel[0] < 0 or sel[-1] >= self.num_hidden_layers:
            raise ValueError(f"GptOssConfig.selected_layers {sel} outside 0..{self.num_hidden_layers - 1}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (half-split RoPE)")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError("need 0 < num_experts_per_tok <= num_local_experts")
        if self.sliding_window < 1:
            raise ValueError("sliding_window must be >= 1")
        if self.moe_block_size < 0:
            raise ValueError("moe_block_size must be >= 0 (0 = automatic)")

    @property
    def num_layers_run(self) -> int:
        """Decoder layers actually computed: up to and including the last selected one."""
        return self.selected_layers[-1] + 1

    @classmethod
    def gpt_oss_20b(cls, **overrides) -> "GptOssConfig":
        return cls(**overrides)

    @classmethod
    def from_dict(cls, d: Any) -> "GptOssConfig":
        """From a plain mapping or an ml_collections ConfigDict; unknown keys raise ValueError."""
        if hasattr(d, "to_dict"):  # ml_collections ConfigDict / FrozenConfigDict
            d = d.to_dict()
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names:
                raise ValueError(f"unknown GptOssConfig key {key!r}; known keys: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["selected_layers"] = list(self.selected_layers)
        return out

    @classmethod
    def from_hf_config(cls, hf_config: Any, **overrides) -> "GptOssConfig":
        """From a transformers GptOssConfig (object or its dict / the hub's config.json).

        Reads both the hub's `rope_scaling` + `rope_theta` fields and transformers 5's
        `rope_parameters`. Missing fields take transformers' GptOssConfig defaults. Features this
        implementation lacks raise ValueError. `overrides` set the non-HF fields (selected_layers,
        dtype, moe_impl, moe_block_size) or replace any field.
        """
        if not isinstance(hf_config, Mapping):
            hf_config = hf_config.to_dict()
        d = dict(hf_config)
        get = lambda k, default: d[k] if d.get(k) is not None else default  # noqa: E731

        if d.get("attention_bias", True) is False:
            raise ValueError("GPT-OSS without attention biases is not supported")
        n_layers = int(get("num_hidden_layers", 36))
        window = d.get("sliding_window", 128)
        layer_types = d.get("layer_types")
        expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        if layer_types is not None and list(layer_types) != expected:
            raise ValueError(f"layer_types {layer_types} differ from the GPT-OSS pattern (even layers sliding)")
        if window is None:
            raise ValueError("sliding_window=None is not supported (GPT-OSS alternates sliding/full)")

        rope = d.get("rope_parameters")
        if not rope:
            rope = d.get("rope_scaling")
        if not rope:  # transformers' GptOssConfig default
            rope = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                    "truncate": False, "original_max_position_embeddings": 4096}
        rope = dict(rope)
        if any(isinstance(v, Mapping) for v in rope.values()):
            raise ValueError("per-layer-type rope_parameters are not supported")
        theta = rope.get("rope_theta") if rope.get("rope_theta") is not None else get("rope_theta", 150000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if rope.get(key) is not None:
                raise ValueError(f"rope parameter {key!r} is not supported")
        if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) not in (None, 1, 1.0):
            raise ValueError("partial_rotary_factor != 1 is not supported")
        max_pos = int(get("max_position_embeddings", 131072))
        if rope_type == "yarn":
            orig = rope.get("original_max_position_embeddings") or d.get("original_max_position_embeddings") or max_pos
            factor = rope.get("factor")
            factor = float(max_pos / orig) if factor is None else float(factor)
            beta_fast = float(rope.get("beta_fast") or 32.0)
            beta_slow = float(rope.get("beta_slow") or 1.0)
            truncate = bool(rope.get("truncate", True))  # transformers' default when absent
        elif rope_type == "default":  # plain RoPE == YaRN with factor 1 (no blending, no scaling)
            orig, factor, beta_fast, beta_slow, truncate = max_pos, 1.0, 32.0, 1.0, True
        else:
            raise ValueError(f"rope_type {rope_type!r} is not supported (yarn or default)")

        n_heads = int(get("num_attention_heads", 64))
        kw = dict(
            vocab_size=int(get("vocab_size", 201088)),
            hidden_size=int(get("hidden_size", 2880)),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=int(get("num_key_value_heads", n_heads)),
            head_dim=int(get("head_dim", int(get("hidden_size", 2880)) // n_heads)),
            num_local_experts=int(d.get("num_local_experts", d.get("num_experts", 128)) or 128),
            num_experts_per_tok=int(get("num_experts_per_tok", 4)),
            intermediate_size=int(get("intermediate_size", 2880)),
            sliding_window=int(window),
            rope_theta=float(theta),
            rope_factor=factor,
            rope_beta_fast=beta_fast,
            rope_beta_slow=beta_slow,
            rope_original_max_position_embeddings=int(orig),
            rope_truncate=truncate,
            rms_norm_eps=float(get("rms_norm_eps", 1e-5)),
            swiglu_limit=float(get("swiglu_limit", 7.0)),
            swiglu_alpha=float(get("swiglu_alpha", 1.702)),
        )
        kw.update(overrides)
        return cls(**kw)


def gpt_oss_param_count(cfg: GptOssConfig, include_lm_head: bool = False) -> int:
    """Parameters of GptOssEncoder(cfg, include_lm_head=...): all layers, embedding, final norm."""
    D, H, K, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, I, V = cfg.num_local_experts, cfg.intermediate_size, cfg.vocab_size
    attn = (D * H * d + H * d) + 2 * (D * K * d + K * d) + (H * d * D + D) + H  # q, k, v, o, sinks
    moe = (D * E + E) + E * (D * 2 * I + 2 * I) + E * (I * D + D)  # router, gate_up, down
    per_layer = attn + moe + 2 * D  # two RMSNorms
    total = V * D + cfg.num_hidden_layers * per_layer + D
    if include_lm_head:
        total += D * V
    return total


# ----------------------------------------------------------------------------------------------
# RoPE (YaRN), as transformers' _compute_yarn_parameters computes it (float32)
# ----------------------------------------------------------------------------------------------


def yarn_inv_freq(cfg: GptOssConfig) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim/2] float32, attention factor multiplying cos and sin)."""
    dim, base, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_factor
    orig = cfg.rope_original_max_position_embeddings
    attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def correction_dim(num_rotations):
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv_extrapolation = np.float32(1.0) / pos_freqs
    inv_interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_factor = (np.float32(1.0) - ramp).astype(np.float32)
    inv_freq = inv_interpolation * (1 - extrapolation_factor) + inv_extrapolation * extrapolation_factor
    return inv_freq.astype(np.float32), attention_factor


def rope_tables(cfg: GptOssConfig, length: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin [length, head_dim/2] float32 for positions 0..length-1, attention factor applied."""
    inv_freq, attention_factor = yarn_inv_freq(cfg)
    freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    return jnp.cos(freqs) * attention_factor, jnp.sin(freqs) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-split rotation. x [B, T, heads, d]; cos/sin [T, d/2] in x's dtype."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# ----------------------------------------------------------------------------------------------
# Mixture of experts
# ----------------------------------------------------------------------------------------------


def _swiglu(gate_up: jax.Array, limit: float, alpha: float) -> jax.Array:
    """Interleaved gate (even columns) / up (odd columns), clamped SwiGLU: [..., 2I] -> [..., I]."""
    gu = gate_up.reshape(gate_up.shape[:-1] + (gate_up.shape[-1] // 2, 2))
    gate, up = gu[..., 0], gu[..., 1]
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))


def _auto_block_size(rows: int, experts: int) -> int:
    per_expert = max(1, -(-rows // experts))
    return int(min(128, max(8, 1 << (per_expert - 1).bit_length())))


def moe_dense(x, idx, w, gu_w, gu_b, dn_w, dn_b, limit, alpha):
    """All experts on all tokens. x [N, D], idx/w [N, k]."""
    E = gu_w.shape[0]
    h = jnp.einsum("nd,edf->nef", x, gu_w) + gu_b[None]
    h = _swiglu(h, limit, alpha)
    y = jnp.einsum("nef,efd->ned", h, dn_w) + dn_b[None]
    combine = jnp.sum(jax.nn.one_hot(idx, E, dtype=jnp.float32) * w[..., None], axis=1)  # [N, E]
    return jnp.einsum("ne,ned->nd", combine, y.astype(jnp.float32))


def _sort_assignments(idx, E):
    N, k = idx.shape
    flat_e = idx.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)  # assignment slots sorted by expert
    sorted_e = flat_e[order]
    sorted_tok = order // k
    sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)
    return order, sorted_e, sorted_tok, sizes


def moe_ragged(x, idx, w, gu_w, gu_b, dn_w, dn_b, limit, alpha):
    """Sort (token, expert) pairs by expert; two grouped matmuls with jax.lax.ragged_dot."""
    N, k = idx.shape
    E = gu_w.shape[0]
    order, sorted_e, sorted_tok, sizes = _sort_assignments(idx, E)
    xs = x[sorted_tok]  # [N*k, D]
    h = jax.lax.ragged_dot(xs, gu_w, sizes) + gu_b[sorted_e]
    h = _swiglu(h, limit, alpha)
    y = jax.lax.ragged_dot(h, dn_w, sizes) + dn_b[sorted_e]  # [N*k, D], sorted order
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    y = y[inverse].reshape(N, k, -1).astype(jnp.float32)
    return jnp.sum(y * w[..., None], axis=1)


def moe_blocked(x, idx, w, gu_w, gu_b, dn_w, dn_b, limit, alpha, block_size=0):
    """Sort (token, expert) pairs by expert into per-expert-padded blocks; scan over the blocks."""
    N, k = idx.shape
    D = x.shape[-1]
    E = gu_w.shape[0]
    A = N * k
    bs = block_size or _auto_block_size(A, E)
    n_blocks = (A + E * (bs - 1)) // bs  # >= sum_e ceil(size_e / bs)
    order, sorted_e, sorted_tok, sizes = _sort_assignments(idx, E)
    padded = (sizes + bs - 1) // bs * bs
    start = jnp.cumsum(sizes) - sizes
    padded_start = jnp.cumsum(padded) - padded
    rank = jnp.arange(A, dtype=jnp.int32) - start[sorted_e]
    dest = padded_start[sorted_e] + rank  # row of each sorted slot in the padded layout
    rows = n_blocks * bs
    row_tok = jnp.full((rows,), N, jnp.int32).at[dest].set(sorted_tok.astype(jnp.int32))
    x_rows = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])[row_tok].reshape(n_blocks, bs, D)
    ends = jnp.cumsum(padded)
    block_e = jnp.minimum(jnp.searchsorted(ends, jnp.arange(n_blocks) * bs, side="right"), E - 1)

    def body(_, inp):
        xb, e = inp
        h = xb @ gu_w[e] + gu_b[e]
        h = _swiglu(h, limit, alpha)
        return None, h @ dn_w[e] + dn_b[e]

    _, y_rows = jax.lax.scan(body, None, (x_rows, block_e))
    y_rows = y_rows.reshape(rows, D)
    slot_row = jnp.zeros((A,), jnp.int32).at[order].set(dest.astype(jnp.int32))  # slot -> padded row
    y = y_rows[slot_row].reshape(N, k, D).astype(jnp.float32)
    return jnp.sum(y * w[..., None], axis=1)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class GptOssDecoderLayer(nnx.Module):
    """One decoder layer; parameters named after the torch module (see the module docstring)."""

    def __init__(self, cfg: GptOssConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, H, K, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        E, I = cfg.num_local_experts, cfg.intermediate_size
        dt = cfg.dtype
        normal = jax.nn.initializers.normal(0.02)
        self.input_layernorm = RMSNorm(D, eps=cfg.rms_norm_eps, dtype=dt, rngs=rngs)
        self.q_proj = Dense(D, (H, d), in_axes=("embed",), out_axes=("heads", "head_dim"), dtype=dt, rngs=rngs)
        self.k_proj = Dense(D, (K, d), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), dtype=dt, rngs=rngs)
        self.v_proj = Dense(D, (K, d), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), dtype=dt, rngs=rngs)
        self.o_proj = Dense((H, d), D, in_axes=("heads", "head_dim"), out_axes=("embed",), dtype=dt, rngs=rngs)
        self.sinks = param(rngs, normal, (H,), ("heads",))
        self.post_attention_layernorm = RMSNorm(D, eps=cfg.rms_norm_eps, dtype=dt, rngs=rngs)
        self.router = Dense(D, E, in_axes=("embed",), out_axes=("experts",), dtype=dt, rngs=rngs)
        self.gate_up_proj = param(rngs, normal, (E, D, 2 * I), ("experts", "embed", "mlp"))
        self.gate_up_proj_bias = param(rngs, normal, (E, 2 * I), ("experts", "mlp"))
        self.down_proj = param(rngs, normal, (E, I, D), ("experts", "mlp", "embed"))
        self.down_proj_bias = param(rngs, normal, (E, D), ("experts", "embed"))

    def attention(self, x, cos, sin, allowed):
        """x [B, T, D] (normed); allowed [B, T, T] bool (query, key)."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, K, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        G = H // K
        q = apply_rope(self.q_proj(x), cos, sin).reshape(B, T, K, G, d)  # head h = kv*G + g
        k = apply_rope(self.k_proj(x), cos, sin)
        v = self.v_proj(x)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
        scores = jnp.where(allowed[:, None, None, :, :], scores, -jnp.inf)
        sinks = self.sinks[...].astype(jnp.float32).reshape(1, K, G, 1, 1)
        sinks = jnp.broadcast_to(sinks, scores.shape[:-1] + (1,))
        # The sink column is always finite, so fully masked rows give zeros, never NaN.
        probs = jax.nn.softmax(jnp.concatenate([scores, sinks], axis=-1), axis=-1)[..., :-1]
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v).reshape(B, T, H, d)
        return self.o_proj(out)

    def moe(self, x):
        """x [B, T, D] (normed) -> [B, T, D]."""
        cfg = self.cfg
        B, T, D = x.shape
        xf = x.reshape(B * T, D)
        logits = self.router(xf)
        top_vals, top_idx = jax.lax.top_k(logits, cfg.num_experts_per_tok)
        weights = jax.nn.softmax(top_vals.astype(jnp.float32), axis=-1)
        dt = xf.dtype
        args = (xf, top_idx, weights, self.gate_up_proj[...].astype(dt), self.gate_up_proj_bias[...].astype(dt),
                self.down_proj[...].astype(dt), self.down_proj_bias[...].astype(dt),
                cfg.swiglu_limit, cfg.swiglu_alpha)
        if cfg.moe_impl == "dense":
            y = moe_dense(*args)
        elif cfg.moe_impl == "ragged":
            y = moe_ragged(*args)
        else:
            y = moe_blocked(*args, block_size=cfg.moe_block_size)
        return y.astype(dt).reshape(B, T, D)

    def __call__(self, x, cos, sin, allowed):
        h = x + self.attention(self.input_layernorm(x), cos, sin, allowed)
        h = constrain(h, RESIDUAL_AXES)
        out = h + self.moe(self.post_attention_layernorm(h))
        return constrain(out, RESIDUAL_AXES)


class GptOssEncoder(nnx.Module):
    """GPT-OSS as the Lens text encoder: `encoder(token_ids, mask) -> [B, T, n_selected, D]`.

    token_ids [B, T] int32, mask [B, T] bool (True = real token; right padding). Positions are
    0..T-1; padding enters only through the key mask. Returns the raw residual-stream outputs of
    cfg.selected_layers (no final norm); layers after the last selected one are not computed.
    Decoder layers are stacked on a leading 'layers' axis and run with jax.lax.scan.
    """

    def __init__(self, cfg: GptOssConfig, *, rngs: nnx.Rngs, include_lm_head: bool = False):
        self.cfg = cfg
        self.dtype = dtype_of(cfg.dtype)
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = param(rngs, jax.nn.initializers.normal(0.02), (V, D), ("vocab", "embed"))

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r):
            return GptOssDecoderLayer(cfg, rngs=r)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(D, eps=cfg.rms_norm_eps, dtype=cfg.dtype, rngs=rngs)
        self.lm_head = (
            Dense(D, V, in_axes=("embed",), out_axes=("vocab",), use_bias=False, dtype=cfg.dtype,
                  kernel_init=fan_in_init(D), rngs=rngs)
            if include_lm_head else None
        )
        self.sliding = tuple(i % 2 == 0 for i in range(cfg.num_hidden_layers))  # even layers: sliding window

    def _run(self, token_ids, mask, return_layers: tuple[int, ...]) -> jax.Array:
        """Embed, run decoder layers 0..max(return_layers) (no further), and return the outputs of
        `return_layers` as [len(return_layers), B, T, D]."""
        cfg = self.cfg
        token_ids = jnp.asarray(token_ids, jnp.int32)
        mask = jnp.asarray(mask, bool)
        B, T = token_ids.shape
        num_layers = max(return_layers) + 1
        x = jnp.take(self.embed_tokens[...], token_ids, axis=0).astype(self.dtype)
        x = constrain(x, RESIDUAL_AXES)
        cos, sin = rope_tables(cfg, T)
        cos, sin = cos.astype(self.dtype), sin.astype(self.dtype)
        q_pos = jnp.arange(T)[:, None]
        k_pos = jnp.arange(T)[None, :]
        causal = (k_pos <= q_pos)[None] & mask[:, None, :]  # [B, T, T]: causal and key padding
        in_window = (q_pos - k_pos < cfg.sliding_window)[None]  # keys q-window+1 .. q

        graphdef, state = nnx.split(self.layers)
        state = jax.tree.map(lambda a: a[:num_layers], state)  # later layers never enter the scan
        sliding = jnp.asarray(self.sliding[:num_layers], dtype=bool)
        slots = np.full((num_layers,), -1, np.int32)  # layer -> index in the output buffer
        slots[list(return_layers)] = np.arange(len(return_layers))
        buf = jnp.zeros((len(return_layers),) + x.shape, x.dtype)

        def body(carry, xs):
            h, buf = carry
            layer_state, is_sliding, slot = xs
            layer = nnx.merge(graphdef, layer_state)
            allowed = causal & (in_window | ~is_sliding)
            h = layer(h, cos, sin, allowed)
            i = jnp.maximum(slot, 0)
            keep = jax.lax.dynamic_index_in_dim(buf, i, 0, keepdims=False)
            buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(slot >= 0, h, keep), i, 0)
            return (h, buf), None

        (_, buf), _ = jax.lax.scan(body, (x, buf), (state, sliding, jnp.asarray(slots)))
        return buf

    def __call__(self, token_ids: jax.Array, mask: jax.Array) -> jax.Array:
        feats = self._run(token_ids, mask, self.cfg.selected_layers)  # [n_sel, B, T, D]
        return jnp.moveaxis(feats, 0, 2)

    def final_hidden(self, token_ids: jax.Array, mask: jax.Array) -> jax.Array:
        """All layers, then the final norm: transformers' last_hidden_state [B, T, D]."""
        last = self._run(token_ids, mask, (self.cfg.num_hidden_layers - 1,))[0]
        return self.norm(last)

    def logits(self, token_ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Next-token logits [B, T, V] (float32); needs include_lm_head=True."""
        if self.lm_head is None:
            raise ValueError("GptOssEncoder was built without include_lm_head")
        h = self.final_hidden(token_ids, mask)
        return self.lm_head(h).astype(jnp.float32)
