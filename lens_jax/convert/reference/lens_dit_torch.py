"""Independent PyTorch reference of the official Lens DiT ("lens-dit"), written from SPEC section 1.

Pure torch (no JAX). It exists only for parity tests: its `state_dict()` has exactly the official key
names (`time_text_embed.timestep_embedder.linear_1.weight`, `transformer_blocks.{i}.attn.img_qkv.weight`,
...), 26 tensors per block + 16 top-level ones (1264 for the official 48-block shape).

Construction takes the official `transformer/config.json` fields:

    LensDiTTorch({"patch_size": 2, "in_channels": 128, "out_channels": 32, "num_layers": 48,
                  "attention_head_dim": 64, "num_attention_heads": 24, "enc_hidden_dim": 2880,
                  "axes_dims_rope": [8, 28, 28], "selected_layer_index": [5, 11, 17, 23]})

`out_channels` of the official config is nominal (32 latent channels): when out_channels *
patch_size^2 == in_channels (32 x 2 x 2 = 128) the real `proj_out` width is `in_channels`, otherwise
it is `out_channels`. Optional non-official fields, written by `lens_jax.convert export` only for
sizes the official config cannot express: `proj_out_channels`, `mlp_hidden_dim` (default
int(inner * 8 / 3)), `rope_theta` (default 10000), `timestep_dim` (default 256). The constructor's
`proj_out_channels=` argument overrides the width for tiny tests.

Only `lens_jax.convert.verify` and the tests import this module (it needs torch: `pip install -e .[test]`).

Forward: `forward(x [B, h, w, C] channels-last packed latents, sigma [B], text_hidden [B, T, L, D],
text_mask [B, T] bool) -> [B, h, w, C_out]`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

ROPE_THETA = 10000.0  # hard-coded upstream, no config key
TIMESTEP_DIM = 256


# ----------------------------------------------------------------------------------------------
# small pieces


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis (computed in float32)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        var = xf.pow(2).mean(dim=-1, keepdim=True)
        y = xf * torch.rsqrt(var + self.eps)
        return (y * self.weight.to(y.dtype)).to(dtype)


def timestep_sinusoid(sigma: torch.Tensor, dim: int = TIMESTEP_DIM) -> torch.Tensor:
    """[cos, sin] sinusoid of sigma; frequencies exp(-ln(10000) k / half), argument (sigma * freq) * 1000.

    `sigma` must already be in the model dtype (SPEC: cast first). Returns float32 [B, dim].
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=sigma.device)
    freqs = torch.exp(-math.log(10000.0) * k / half)
    arg = (sigma.float()[:, None] * freqs[None, :]) * 1000.0
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, inner: int, timestep_dim: int = TIMESTEP_DIM):
        super().__init__()
        self.timestep_dim = timestep_dim
        self.linear_1 = nn.Linear(timestep_dim, inner, bias=True)
        self.linear_2 = nn.Linear(inner, inner, bias=True)

    def forward(self, sinusoid: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(sinusoid)))


class TimeTextEmbed(nn.Module):
    """Holds only `timestep_embedder` (no pooled text, no guidance embedding)."""

    def __init__(self, inner: int, timestep_dim: int = TIMESTEP_DIM):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(inner, timestep_dim)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no bias."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# ----------------------------------------------------------------------------------------------
# RoPE


def reference_positions(h: int, w: int, num_text: int) -> torch.Tensor:
    """Integer (frame, row, col) positions [h*w + num_text, 3] of the joint sequence [image; text].

    Image token (i, j), row-major, sits at (0, i - (h - h//2), j - (w - w//2)); text token t sits at
    max(h//2, w//2) + t on all three axes (frame included).
    """
    pos = []
    for i in range(h):
        for j in range(w):
            pos.append((0, i - (h - h // 2), j - (w - w // 2)))
    start = max(h // 2, w // 2)
    for t in range(num_text):
        pos.append((start + t, start + t, start + t))
    return torch.tensor(pos, dtype=torch.int64).reshape(h * w + num_text, 3)


def rope_complex(positions: torch.Tensor, axes_dims, theta: float = ROPE_THETA) -> torch.Tensor:
    """Unit complex rotations [N, head_dim/2]: pairs ordered frame, then row, then col axis."""
    parts = []
    for a, d in enumerate(axes_dims):
        assert d % 2 == 0, "each RoPE axis needs an even number of dims"
        inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        ang = positions[:, a].to(torch.float64)[:, None] * inv_freq[None, :]
        parts.append(ang)
    ang = torch.cat(parts, dim=-1)
    return torch.polar(torch.ones_like(ang), ang)  # complex128


def apply_rope_interleaved(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [B, N, H, Dh] by rot [N, Dh/2] (complex)."""
    B, N, H, Dh = x.shape
    xc = torch.view_as_complex(x.to(torch.float64).reshape(B, N, H, Dh // 2, 2).contiguous())
    out = torch.view_as_real(xc * rot[None, :, None, :]).reshape(B, N, H, Dh)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# attention + block


class JointAttention(nn.Module):
    def __init__(self, inner: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.img_qkv = nn.Linear(inner, 3 * heads * head_dim, bias=True)
        self.txt_qkv = nn.Linear(inner, 3 * heads * head_dim, bias=True)
        self.norm_q = RMSNorm(head_dim, eps=1e-6)
        self.norm_k = RMSNorm(head_dim, eps=1e-6)
        self.norm_added_q = RMSNorm(head_dim, eps=1e-6)
        self.norm_added_k = RMSNorm(head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, inner, bias=True)])
        self.to_add_out = nn.Linear(heads * head_dim, inner, bias=True)

    def _split(self, qkv: torch.Tensor):
        B, N, _ = qkv.shape
        qkv = qkv.reshape(B, N, 3, self.heads, self.head_dim)  # rows [q, k, v], head-major
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def forward(self, img, txt, rot, key_valid):
        """img [B, Ni, d], txt [B, Nt, d], rot [Ni+Nt, Dh/2] complex, key_valid [B, Nt] bool."""
        Ni = img.shape[1]
        iq, ik, iv = self._split(self.img_qkv(img))
        tq, tk, tv = self._split(self.txt_qkv(txt))
        iq, ik = self.norm_q(iq), self.norm_k(ik)
        tq, tk = self.norm_added_q(tq), self.norm_added_k(tk)
        q = torch.cat([iq, tq], dim=1)
        k = torch.cat([ik, tk], dim=1)
        v = torch.cat([iv, tv], dim=1)
        q = apply_rope_interleaved(q, rot)
        k = apply_rope_interleaved(k, rot)
        # explicit softmax attention: [B, H, Nq, Nk]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / math.sqrt(self.head_dim))
        B = img.shape[0]
        valid = torch.cat([torch.ones(B, Ni, dtype=torch.bool, device=img.device), key_valid], dim=1)
        bias = torch.zeros(valid.shape, dtype=scores.dtype, device=scores.device)
        bias = bias.masked_fill(~valid, float("-inf"))
        scores = scores + bias[:, None, None, :]  # key side only
        probs = torch.softmax(scores, dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
        out = out.reshape(B, out.shape[1], self.heads * self.head_dim)
        return self.to_out[0](out[:, :Ni]), self.to_add_out(out[:, Ni:])


class DoubleStreamBlock(nn.Module):
    def __init__(self, inner: int, heads: int, head_dim: int, mlp_hidden: int):
        super().__init__()
        self.attn = JointAttention(inner, heads, head_dim)
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(inner, 6 * inner, bias=True))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(inner, 6 * inner, bias=True))
        self.img_norm1 = RMSNorm(inner, eps=1e-6)
        self.img_norm2 = RMSNorm(inner, eps=1e-6)
        self.txt_norm1 = RMSNorm(inner, eps=1e-6)
        self.txt_norm2 = RMSNorm(inner, eps=1e-6)
        self.img_mlp = SwiGLU(inner, mlp_hidden)
        self.txt_mlp = SwiGLU(inner, mlp_hidden)

    def forward(self, img, txt, temb, rot, key_valid):
        # modulation Linear applied to SiLU(temb) (the Sequential's SiLU); chunk order
        # (shift, scale, gate) for attention, then (shift, scale, gate) for the MLP.
        i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = [c[:, None, :] for c in self.img_mod(temb).chunk(6, dim=-1)]
        t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = [c[:, None, :] for c in self.txt_mod(temb).chunk(6, dim=-1)]
        img_in = self.img_norm1(img) * (1 + i_sc1) + i_sh1
        txt_in = self.txt_norm1(txt) * (1 + t_sc1) + t_sh1
        img_attn, txt_attn = self.attn(img_in, txt_in, rot, key_valid)
        img = img + i_g1 * img_attn
        txt = txt + t_g1 * txt_attn
        img = img + i_g2 * self.img_mlp(self.img_norm2(img) * (1 + i_sc2) + i_sh2)
        txt = txt + t_g2 * self.txt_mlp(self.txt_norm2(txt) * (1 + t_sc2) + t_sh2)
        return img, txt


class NormOut(nn.Module):
    """LayerNorm (no affine, eps 1e-6), then linear(silu(temb)) -> (SCALE, SHIFT) in that order."""

    def __init__(self, inner: int):
        super().__init__()
        self.linear = nn.Linear(inner, 2 * inner, bias=True)

    def forward(self, x, temb):
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=-1)
        xn = F.layer_norm(x, (x.shape[-1],), weight=None, bias=None, eps=1e-6)
        return xn * (1 + scale[:, None, :]) + shift[:, None, :]


# ----------------------------------------------------------------------------------------------
# the model


class LensDiTTorch(nn.Module):
    def __init__(self, config: Mapping[str, Any], proj_out_channels: Optional[int] = None):
        super().__init__()
        self.config = dict(config)
        heads = int(config["num_attention_heads"])
        head_dim = int(config["attention_head_dim"])
        inner = heads * head_dim
        in_ch = int(config["in_channels"])
        enc = int(config["enc_hidden_dim"])
        n_text = len(config["selected_layer_index"])
        self.axes_dims_rope = [int(a) for a in config["axes_dims_rope"]]
        assert sum(self.axes_dims_rope) == head_dim, "axes_dims_rope must sum to attention_head_dim"
        self.heads, self.head_dim, self.inner = heads, head_dim, inner
        self.num_text_layers = n_text
        self.enc_hidden_dim = enc
        if proj_out_channels is not None:
            out_ch = int(proj_out_channels)
        elif config.get("proj_out_channels") is not None:
            out_ch = int(config["proj_out_channels"])
        elif config.get("out_channels") is None:
            out_ch = in_ch
        else:
            p = int(config.get("patch_size") or 2)
            out_ch = in_ch if int(config["out_channels"]) * p * p == in_ch else int(config["out_channels"])
        mlp_hidden = int(config.get("mlp_hidden_dim") or int(inner * 8 / 3))
        self.rope_theta = float(config.get("rope_theta") or ROPE_THETA)
        self.timestep_dim = int(config.get("timestep_dim") or TIMESTEP_DIM)

        self.time_text_embed = TimeTextEmbed(inner, self.timestep_dim)
        self.txt_norm = nn.ModuleList([RMSNorm(enc, eps=1e-5) for _ in range(n_text)])
        self.txt_in = nn.Linear(n_text * enc, inner, bias=True)
        self.img_in = nn.Linear(in_ch, inner, bias=True)
        self.transformer_blocks = nn.ModuleList(
            [DoubleStreamBlock(inner, heads, head_dim, mlp_hidden) for _ in range(int(config["num_layers"]))]
        )
        self.norm_out = NormOut(inner)
        self.proj_out = nn.Linear(inner, out_ch, bias=True)

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    def embed_text(self, text_hidden: torch.Tensor) -> torch.Tensor:
        L = text_hidden.shape[2]
        assert L == self.num_text_layers
        normed = [self.txt_norm[i](text_hidden[:, :, i, :]) for i in range(L)]
        return self.txt_in(torch.cat(normed, dim=-1))

    def forward(self, x, sigma, text_hidden, text_mask):
        dtype = self.dtype
        B, h, w, C = x.shape
        T = text_hidden.shape[1]
        x = x.to(dtype)
        text_hidden = text_hidden.to(dtype)
        sigma = sigma.to(dtype)  # cast to the model dtype first
        temb = self.time_text_embed.timestep_embedder(timestep_sinusoid(sigma, self.timestep_dim).to(dtype))

        img = self.img_in(x.reshape(B, h * w, C))
        txt = self.embed_text(text_hidden)
        rot = rope_complex(reference_positions(h, w, T), self.axes_dims_rope, self.rope_theta).to(x.device)
        key_valid = text_mask.to(torch.bool)
        for blk in self.transformer_blocks:
            img, txt = blk(img, txt, temb, rot, key_valid)
        out = self.proj_out(self.norm_out(img, temb))
        return out.reshape(B, h, w, out.shape[-1])


def official_config() -> dict:
    """The official `transformer/config.json` fields (SPEC section 1)."""
    return {
        "patch_size": 2,
        "in_channels": 128,
        "out_channels": 32,
        "num_layers": 48,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "enc_hidden_dim": 2880,
        "axes_dims_rope": [8, 28, 28],
        "selected_layer_index": [5, 11, 17, 23],
    }
