"""Analytic FLOPs of the Lens MMDiT (SPEC section 7): matmuls per stream, joint attention, per-sample terms.

Training FLOPs per sample = 6 * (P_img * T_img + P_txt * T_txt + P_sample) + 12 * L * d * (T_img + T_txt)^2,
where P_img / P_txt are the matmul weights a token of each stream touches and P_sample the ones
used once per sample (timestep embedder, modulation, final adaLN). Forward alone is a third.
Remat recomputation is not counted (MFU counts model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import dataclasses

from lens_jax.models.dit import DiTConfig


@dataclasses.dataclass(frozen=True)
class MatmulParams:
    image_token: int
    text_token: int
    per_sample: int


def dit_matmul_params(cfg: DiTConfig) -> MatmulParams:
    d, m, n = cfg.inner_dim, cfg.mlp_dim, cfg.num_layers
    stream_block = 3 * d * d + d * d + 3 * d * m  # fused qkv, output projection, SwiGLU
    return MatmulParams(
        image_token=n * stream_block + cfg.in_channels * d + d * cfg.out_channels,
        text_token=n * stream_block + cfg.num_text_layers * cfg.enc_hidden_dim * d,
        per_sample=cfg.timestep_dim * d + d * d + n * 2 * d * 6 * d + d * 2 * d,
    )


def dit_forward_flops(cfg: DiTConfig, image_tokens: int, text_tokens: int) -> float:
    p = dit_matmul_params(cfg)
    dense = 2.0 * (p.image_token * image_tokens + p.text_token * text_tokens + p.per_sample)
    attention = 4.0 * cfg.num_layers * cfg.inner_dim * float(image_tokens + text_tokens) ** 2
    return dense + attention


def dit_train_flops(cfg: DiTConfig, image_tokens: int, text_tokens: int) -> float:
    """Forward + backward model FLOPs per sample (backward = 2x forward)."""
    return 3.0 * dit_forward_flops(cfg, image_tokens, text_tokens)
