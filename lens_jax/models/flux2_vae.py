"""The FLUX.2 VAE (diffusers `AutoencoderKLFlux2`) in Flax NNX, channels-last (NHWC) throughout.

Computation matches diffusers 0.42 `AutoencoderKLFlux2` (non-tiled, no slicing) exactly:

  encode: conv_in 3x3 -> down blocks (resnets, then pad right/bottom by 1 and a 3x3 stride-2 conv
          without padding, except the last block) -> mid block (resnet, single-head attention with
          head_dim = C, resnet) -> GroupNorm -> SiLU -> conv_out 3x3 to 2*latent -> quant_conv 1x1 ->
          split (first half mean, second half log-variance clamped to [-30, 20]).
  decode: post_quant_conv 1x1 -> conv_in 3x3 -> mid block -> up blocks (layers_per_block + 1 resnets,
          then nearest x2 and a 3x3 conv, except the last block) -> GroupNorm -> SiLU -> conv_out 3x3.

GroupNorm (eps 1e-6) is computed in float32; the attention softmax is float32. Parameters are float32
master weights carrying logical axis names; `cfg.dtype` is the compute dtype. The latent batch-norm
statistics (`bn_running_mean`, `bn_running_var`, [4 * latent]) are `nnx.BatchStat`, not `nnx.Param`:
`nnx.split(model, nnx.Param, ...)` leaves them out, so training never updates them. They are used by
the pipeline-side latent packing (`lens_jax.models.codec.Flux2Codec`), not inside encode/decode.

Parameter table (NNX path, '.'-joined; diffusers key; layout transform torch -> NNX; Black Forest
Labs `ae.safetensors` key). i = down-block index, j = resnet index, k = up-block index in NNX/diffusers
order, n = number of up blocks (BFL numbers up blocks in the reverse order: `decoder.up.{n-1-k}`).
Leaf names: NNX `kernel` <-> torch `weight` (conv: OIHW -> HWIO, `w.transpose(2, 3, 1, 0)`; linear:
[out, in] -> [in, out], `w.T`); NNX `scale` <-> torch GroupNorm `weight` (no transform); `bias`
unchanged. BFL's attention q/k/v/proj_out are [C, C, 1, 1] 1x1 convs: NNX kernel = `w[:, :, 0, 0].T`.
Otherwise the NNX path equals the diffusers key with the leaf renamed (`diffusers_key` below).

  NNX path                                               diffusers key                                          transform  BFL ae.safetensors key
  encoder.conv_in.{kernel,bias}                          encoder.conv_in.{weight,bias}                          conv       encoder.conv_in.{weight,bias}
  encoder.down_blocks.i.resnets.j.norm1.{scale,bias}     encoder.down_blocks.i.resnets.j.norm1.{weight,bias}    -          encoder.down.i.block.j.norm1.{weight,bias}
  encoder.down_blocks.i.resnets.j.conv1.{kernel,bias}    encoder.down_blocks.i.resnets.j.conv1.{weight,bias}    conv       encoder.down.i.block.j.conv1.{weight,bias}
  encoder.down_blocks.i.resnets.j.norm2.{scale,bias}     encoder.down_blocks.i.resnets.j.norm2.{weight,bias}    -          encoder.down.i.block.j.norm2.{weight,bias}
  encoder.down_blocks.i.resnets.j.conv2.{kernel,bias}    encoder.down_blocks.i.resnets.j.conv2.{weight,bias}    conv       encoder.down.i.block.j.conv2.{weight,bias}
  encoder.down_blocks.i.resnets.j.conv_shortcut.kernel   encoder.down_blocks.i.resnets.j.conv_shortcut.weight   conv (1x1) encoder.down.i.block.j.nin_shortcut.weight
  encoder.down_blocks.i.resnets.j.conv_shortcut.bias     encoder.down_blocks.i.resnets.j.conv_shortcut.bias     -          encoder.down.i.block.j.nin_shortcut.bias
      (conv_shortcut only where the resnet changes the channel count: j = 0 of a block whose width grows)
  encoder.down_blocks.i.downsamplers.0.conv.kernel       encoder.down_blocks.i.downsamplers.0.conv.weight       conv       encoder.down.i.downsample.conv.weight
  encoder.down_blocks.i.downsamplers.0.conv.bias         encoder.down_blocks.i.downsamplers.0.conv.bias         -          encoder.down.i.downsample.conv.bias
      (every down block but the last)
  encoder.mid_block.resnets.0.<resnet leaves>            encoder.mid_block.resnets.0.<...>                      as above   encoder.mid.block_1.<...>
  encoder.mid_block.resnets.1.<resnet leaves>            encoder.mid_block.resnets.1.<...>                      as above   encoder.mid.block_2.<...>
  encoder.mid_block.attentions.0.group_norm.scale        encoder.mid_block.attentions.0.group_norm.weight       -          encoder.mid.attn_1.norm.weight
  encoder.mid_block.attentions.0.group_norm.bias         encoder.mid_block.attentions.0.group_norm.bias         -          encoder.mid.attn_1.norm.bias
  encoder.mid_block.attentions.0.to_q.{kernel,bias}      encoder.mid_block.attentions.0.to_q.{weight,bias}      linear     encoder.mid.attn_1.q.{weight,bias}        (BFL: 1x1 conv)
  encoder.mid_block.attentions.0.to_k.{kernel,bias}      encoder.mid_block.attentions.0.to_k.{weight,bias}      linear     encoder.mid.attn_1.k.{weight,bias}        (BFL: 1x1 conv)
  encoder.mid_block.attentions.0.to_v.{kernel,bias}      encoder.mid_block.attentions.0.to_v.{weight,bias}      linear     encoder.mid.attn_1.v.{weight,bias}        (BFL: 1x1 conv)
  encoder.mid_block.attentions.0.to_out.0.{kernel,bias}  encoder.mid_block.attentions.0.to_out.0.{weight,bias}  linear     encoder.mid.attn_1.proj_out.{weight,bias} (BFL: 1x1 conv)
  encoder.conv_norm_out.{scale,bias}                     encoder.conv_norm_out.{weight,bias}                    -          encoder.norm_out.{weight,bias}
  encoder.conv_out.{kernel,bias}                         encoder.conv_out.{weight,bias}                         conv       encoder.conv_out.{weight,bias}
  quant_conv.{kernel,bias}                               quant_conv.{weight,bias}                               conv       encoder.quant_conv.{weight,bias}
  post_quant_conv.{kernel,bias}                          post_quant_conv.{weight,bias}                          conv       decoder.post_quant_conv.{weight,bias}
  decoder.conv_in.{kernel,bias}                          decoder.conv_in.{weight,bias}                          conv       decoder.conv_in.{weight,bias}
  decoder.mid_block.<as encoder.mid_block>               decoder.mid_block.<...>                                as above   decoder.mid.{block_1,attn_1,block_2}.<...>
  decoder.up_blocks.k.resnets.j.<resnet leaves>          decoder.up_blocks.k.resnets.j.<...>                    as above   decoder.up.{n-1-k}.block.j.<...> (nin_shortcut)
  decoder.up_blocks.k.upsamplers.0.conv.{kernel,bias}    decoder.up_blocks.k.upsamplers.0.conv.{weight,bias}    conv       decoder.up.{n-1-k}.upsample.conv.{weight,bias}
      (every up block but the last, k = n-1)
  decoder.conv_norm_out.{scale,bias}                     decoder.conv_norm_out.{weight,bias}                    -          decoder.norm_out.{weight,bias}
  decoder.conv_out.{kernel,bias}                         decoder.conv_out.{weight,bias}                         conv       decoder.conv_out.{weight,bias}
  bn_running_mean   (nnx.BatchStat)                      bn.running_mean                                        -          bn.running_mean
  bn_running_var    (nnx.BatchStat)                      bn.running_var                                         -          bn.running_var
  (none: dropped on import, write 0 or the stored value on export)  bn.num_batches_tracked (int64 scalar)       -          bn.num_batches_tracked

The BFL column follows diffusers' scripts/convert_flux2_to_diffusers.py (note that BFL keeps the quant
convs inside encoder/decoder, which SPEC section 3 does not list); the test checks it by running
diffusers' LDM-VAE converter on names made by `bfl_key`. Biases ("-") are never transformed.
`diffusers_key(path)` and `bfl_key(path, num_up_blocks)` compute the two right-hand columns from an
NNX path; `kernel_from_torch` / `kernel_to_torch` do the layout transforms. The real FLUX.2 shape
(`Flux2VAEConfig.flux2()`) has 84,046,115 parameters and 251 diffusers state-dict keys (248 parameters
+ running_mean, running_var, num_batches_tracked).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lens_jax.models.layers import DTYPES, Dense, attention, dtype_of, fan_in_init, ones_init, param, zeros_init

GROUP_NORM_EPS = 1e-6  # every GroupNorm of the diffusers Encoder / Decoder / mid-block attention
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # DiagonalGaussianDistribution's clamp
PATCH = 2  # the pipeline's 2x2 latent patchify (diffusers `patch_size=(2, 2)`)

# Logical axes of the VAE's parameters (all replicated: see lens_jax/parallel/rules.py).
CONV_AXES = ("conv_kernel", "conv_kernel", "conv_in", "conv_out")

# diffusers config keys that do not change encode/decode (ignored by `from_diffusers_config`).
_DIFFUSERS_IGNORED = ("sample_size", "batch_norm_momentum", "force_upcast")


@dataclasses.dataclass(frozen=True)
class Flux2VAEConfig:
    """Fields named as diffusers' `AutoencoderKLFlux2` config; the defaults are the real FLUX.2 VAE."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None  # None: same as block_out_channels
    layers_per_block: int = 2  # resnets per down block; up blocks have one more
    latent_channels: int = 32
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    dtype: str = "float32"  # compute dtype; parameters stay float32

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if self.decoder_block_out_channels is not None:
            object.__setattr__(self, "decoder_block_out_channels", tuple(int(c) for c in self.decoder_block_out_channels))
        if self.dtype not in DTYPES:
            raise ValueError(f"Flux2VAEConfig.dtype {self.dtype!r} not in {sorted(DTYPES)}")
        if not self.block_out_channels:
            raise ValueError("Flux2VAEConfig.block_out_channels is empty")
        if len(self.decoder_channels) != len(self.block_out_channels):
            raise ValueError(
                f"Flux2VAEConfig.decoder_block_out_channels {self.decoder_block_out_channels} must have as many "
                f"entries as block_out_channels {self.block_out_channels} (equal down- and up-sampling)"
            )
        if self.layers_per_block < 1:
            raise ValueError("Flux2VAEConfig.layers_per_block must be >= 1")
        for c in self.block_out_channels + self.decoder_channels:
            if c <= 0 or c % self.norm_num_groups:
                raise ValueError(f"Flux2VAEConfig: channel count {c} is not a positive multiple of norm_num_groups={self.norm_num_groups}")
        if min(self.in_channels, self.out_channels, self.latent_channels) <= 0:
            raise ValueError("Flux2VAEConfig: in_channels, out_channels and latent_channels must be positive")
        if not self.batch_norm_eps > 0:
            raise ValueError("Flux2VAEConfig.batch_norm_eps must be positive")

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def vae_downsample(self) -> int:
        """Pixels per latent side inside the VAE (8 for FLUX.2)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def downsample(self) -> int:
        """Pixels per packed-token side after the pipeline's 2x2 patchify (16 for FLUX.2)."""
        return PATCH * self.vae_downsample

    @property
    def packed_channels(self) -> int:
        return PATCH * PATCH * self.latent_channels

    @classmethod
    def flux2(cls, **overrides) -> "Flux2VAEConfig":
        return cls(**overrides)

    @classmethod
    def from_dict(cls, d: Any) -> "Flux2VAEConfig":
        """From a plain mapping or an ml_collections ConfigDict; unknown keys raise ValueError naming them."""
        if hasattr(d, "to_dict"):
            d = d.to_dict()
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names)
        if unknown:
            raise ValueError(f"unknown Flux2VAEConfig key(s) {unknown}; known keys: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["block_out_channels"] = list(self.block_out_channels)
        if self.decoder_block_out_channels is not None:
            out["decoder_block_out_channels"] = list(self.decoder_block_out_channels)
        return out

    @classmethod
    def from_diffusers_config(cls, d: Any, **overrides) -> "Flux2VAEConfig":
        """From a diffusers `AutoencoderKLFlux2` config (its `.config`, or the hub's config.json as a dict).

        Bookkeeping keys (leading underscore: `_class_name`, `_diffusers_version`, ...) and keys that do
        not change encode/decode (`sample_size`: tiling only; `batch_norm_momentum`: running-stat updates,
        which never happen here; `force_upcast`: a pipeline hint) are ignored. Block types, `act_fn` and
        `patch_size` must have the only values implemented; other unknown keys raise. `overrides` (e.g.
        dtype) replace fields.
        """
        d = dict(d.items() if hasattr(d, "items") else d)
        n_down = len(d.get("block_out_channels", cls.block_out_channels))
        dec = d.get("decoder_block_out_channels")
        n_up = len(dec) if dec else n_down
        checks = {
            "down_block_types": lambda v: list(v) == ["DownEncoderBlock2D"] * n_down,
            "up_block_types": lambda v: list(v) == ["UpDecoderBlock2D"] * n_up,
            "act_fn": lambda v: v in ("silu", "swish"),
            "patch_size": lambda v: list(v) == [PATCH, PATCH],
        }
        kwargs = {}
        for key, value in d.items():
            if key.startswith("_") or key in _DIFFUSERS_IGNORED:
                continue
            if key in checks:
                if not checks[key](value):
                    raise ValueError(f"diffusers AutoencoderKLFlux2 config {key}={value!r} is not supported")
                continue
            kwargs[key] = value
        kwargs.update(overrides)
        return cls.from_dict(kwargs)


# ----------------------------------------------------------------------------------------------
# Layers.


class Conv(nnx.Module):
    """2-D convolution, NHWC activations, HWIO kernel (torch OIHW transposed (2, 3, 1, 0))."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1, padding=None,
                 dtype="float32", rngs: nnx.Rngs | None = None):
        fan_in = in_ch * kernel_size * kernel_size  # torch's default init bound 1/sqrt(fan_in)
        self.kernel = param(rngs, fan_in_init(fan_in), (kernel_size, kernel_size, in_ch, out_ch), CONV_AXES)
        self.bias = param(rngs, fan_in_init(fan_in), (out_ch,), ("conv_out",))
        p = kernel_size // 2
        self.padding = ((p, p), (p, p)) if padding is None else tuple(tuple(x) for x in padding)
        self.stride = stride
        self.dtype = dtype_of(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm over NHWC (groups of consecutive channels), computed in float32."""

    def __init__(self, channels: int, num_groups: int, *, eps: float = GROUP_NORM_EPS, dtype="float32",
                 rngs: nnx.Rngs | None = None):
        self.num_groups, self.eps = num_groups, eps
        self.scale = param(rngs, ones_init, (channels,), ("norm",))
        self.bias = param(rngs, zeros_init, (channels,), ("norm",))
        self.dtype = dtype_of(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        g = self.num_groups
        x32 = x.astype(jnp.float32).reshape(b, h, w, g, c // g)
        mean = jnp.mean(x32, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2, 4), keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class ResnetBlock(nnx.Module):
    """diffusers ResnetBlock2D without time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x))))))."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, *, dtype="float32", rngs: nnx.Rngs | None = None):
        self.norm1 = GroupNorm(in_ch, groups, dtype=dtype, rngs=rngs)
        self.conv1 = Conv(in_ch, out_ch, 3, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(out_ch, groups, dtype=dtype, rngs=rngs)
        self.conv2 = Conv(out_ch, out_ch, 3, dtype=dtype, rngs=rngs)
        self.conv_shortcut = Conv(in_ch, out_ch, 1, dtype=dtype, rngs=rngs) if in_ch != out_ch else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nnx.Module):
    """The mid-block self-attention: GroupNorm, one head with head_dim = C, residual added."""

    def __init__(self, channels: int, groups: int, *, dtype="float32", rngs: nnx.Rngs | None = None):
        self.group_norm = GroupNorm(channels, groups, dtype=dtype, rngs=rngs)
        linear = lambda: Dense(channels, channels, in_axes=("conv_in",), out_axes=("conv_out",), dtype=dtype, rngs=rngs)
        self.to_q, self.to_k, self.to_v = linear(), linear(), linear()
        self.to_out = nnx.List([linear()])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, 1, c)
        o = attention(self.to_q(t), self.to_k(t), self.to_v(t))  # scale C ** -0.5
        o = self.to_out[0](o.reshape(b, h * w, c)).reshape(b, h, w, c)
        return o + x.astype(o.dtype)


class MidBlock(nnx.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool, *, dtype="float32", rngs: nnx.Rngs | None = None):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([Attention(channels, groups, dtype=dtype, rngs=rngs)]) if add_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nnx.Module):
    """Pad right and bottom by 1, then a 3x3 stride-2 conv without padding."""

    def __init__(self, channels: int, *, dtype="float32", rngs: nnx.Rngs | None = None):
        self.conv = Conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int, *, dtype="float32", rngs: nnx.Rngs | None = None):
        self.conv = Conv(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, add_downsample: bool, *,
                 dtype="float32", rngs: nnx.Rngs | None = None):
        self.resnets = nnx.List([
            ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups, dtype=dtype, rngs=rngs) for j in range(num_layers)
        ])
        self.downsamplers = nnx.List([Downsample(out_ch, dtype=dtype, rngs=rngs)]) if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, add_upsample: bool, *,
                 dtype="float32", rngs: nnx.Rngs | None = None):
        self.resnets = nnx.List([
            ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups, dtype=dtype, rngs=rngs) for j in range(num_layers)
        ])
        self.upsamplers = nnx.List([Upsample(out_ch, dtype=dtype, rngs=rngs)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: Flux2VAEConfig, *, rngs: nnx.Rngs | None = None):
        boc, g, dt = cfg.block_out_channels, cfg.norm_num_groups, cfg.dtype
        self.conv_in = Conv(cfg.in_channels, boc[0], 3, dtype=dt, rngs=rngs)
        self.down_blocks = nnx.List([
            DownBlock(boc[max(i - 1, 0)], boc[i], cfg.layers_per_block, g, i != len(boc) - 1, dtype=dt, rngs=rngs)
            for i in range(len(boc))
        ])
        self.mid_block = MidBlock(boc[-1], g, cfg.mid_block_add_attention, dtype=dt, rngs=rngs)
        self.conv_norm_out = GroupNorm(boc[-1], g, dtype=dt, rngs=rngs)
        self.conv_out = Conv(boc[-1], 2 * cfg.latent_channels, 3, dtype=dt, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: Flux2VAEConfig, *, rngs: nnx.Rngs | None = None):
        boc, g, dt = cfg.decoder_channels, cfg.norm_num_groups, cfg.dtype
        rev = boc[::-1]
        self.conv_in = Conv(cfg.latent_channels, boc[-1], 3, dtype=dt, rngs=rngs)
        self.mid_block = MidBlock(boc[-1], g, cfg.mid_block_add_attention, dtype=dt, rngs=rngs)
        self.up_blocks = nnx.List([
            UpBlock(rev[max(k - 1, 0)], rev[k], cfg.layers_per_block + 1, g, k != len(rev) - 1, dtype=dt, rngs=rngs)
            for k in range(len(rev))
        ])
        self.conv_norm_out = GroupNorm(boc[0], g, dtype=dt, rngs=rngs)
        self.conv_out = Conv(boc[0], cfg.out_channels, 3, dtype=dt, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Flux2VAE(nnx.Module):
    """AutoencoderKLFlux2 in NHWC. `encode` -> (mean, logvar); `decode` -> images in about [-1, 1]."""

    def __init__(self, cfg: Flux2VAEConfig, *, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        lat = cfg.latent_channels
        self.quant_conv = Conv(2 * lat, 2 * lat, 1, dtype=cfg.dtype, rngs=rngs) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv(lat, lat, 1, dtype=cfg.dtype, rngs=rngs) if cfg.use_post_quant_conv else None
        n = cfg.packed_channels
        self.bn_running_mean = nnx.BatchStat(jnp.zeros((n,), jnp.float32), out_sharding=("norm",), eager_sharding=False)
        self.bn_running_var = nnx.BatchStat(jnp.ones((n,), jnp.float32), out_sharding=("norm",), eager_sharding=False)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, H, W, in_channels] in [-1, 1] -> (mean, logvar), each [B, H/8, W/8, latent]."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: jax.Array) -> jax.Array:
        """z [B, h, w, latent] -> [B, 8h, 8w, out_channels] (not clamped)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction through the posterior mode (diffusers forward with sample_posterior=False)."""
        return self.decode(self.encode(x)[0])


def abstract_flux2_vae(cfg: Flux2VAEConfig) -> tuple[Any, nnx.State]:
    """(graphdef, full state as ShapeDtypeStructs: Params and the two BatchStats), allocating nothing."""
    box = []

    def build():
        graphdef, state = nnx.split(Flux2VAE(cfg, rngs=nnx.Rngs(0)))
        box.append(graphdef)
        return state

    state = jax.eval_shape(build)
    return box[0], state


def flux2_vae_param_count(cfg: Flux2VAEConfig) -> int:
    """Trainable parameters (nnx.Param), excluding the batch-norm statistics."""
    params = jax.eval_shape(lambda: nnx.split(Flux2VAE(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)[1])
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------------------------
# Names and layouts for converters.

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_BN = {"bn_running_mean": "bn.running_mean", "bn_running_var": "bn.running_var"}


def _parts(path: str | Sequence) -> list[str]:
    return path.split(".") if isinstance(path, str) else [str(getattr(p, "key", p)) for p in path]


def diffusers_key(path: str | Sequence) -> str:
    """NNX state path ('.'-joined string or tuple of keys) -> diffusers state-dict key."""
    parts = _parts(path)
    joined = ".".join(parts)
    if joined in _BN:
        return _BN[joined]
    if parts[-1] not in _LEAF_TO_TORCH:
        raise KeyError(f"not a Flux2VAE parameter path: {joined!r}")
    return ".".join(parts[:-1] + [_LEAF_TO_TORCH[parts[-1]]])


def bfl_key(path: str | Sequence, num_up_blocks: int) -> str:
    """NNX state path -> Black Forest Labs `ae.safetensors` key (see the module docstring's table)."""
    key = diffusers_key(path)
    p = key.split(".")
    if p[0] == "bn":
        return key
    if p[0] == "quant_conv":
        return "encoder." + key
    if p[0] == "post_quant_conv":
        return "decoder." + key
    out = [p[0]]
    rest = p[1:]
    if rest[0] in ("down_blocks", "up_blocks"):
        i = int(rest[1])
        if rest[0] == "down_blocks":
            out += ["down", str(i)]
        else:
            out += ["up", str(num_up_blocks - 1 - i)]
        rest = rest[2:]
        if rest[0] == "resnets":
            out += ["block", rest[1]]
            rest = rest[2:]
        else:  # downsamplers.0.conv / upsamplers.0.conv
            out += ["downsample" if rest[0] == "downsamplers" else "upsample"]
            rest = rest[2:]
    elif rest[0] == "mid_block":
        if rest[1] == "resnets":
            out += ["mid", f"block_{int(rest[2]) + 1}"]
            rest = rest[3:]
        else:  # attentions.0.<name>
            name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[rest[3]]
            out += ["mid", "attn_1", name]
            rest = rest[5:] if rest[3] == "to_out" else rest[4:]
    elif rest[0] == "conv_norm_out":
        out += ["norm_out"]
        rest = rest[1:]
    if rest and rest[0] == "conv_shortcut":
        rest = ["nin_shortcut"] + rest[1:]
    return ".".join(out + rest)


def kernel_from_torch(w: np.ndarray, bfl_attention: bool = False) -> np.ndarray:
    """A torch weight -> the NNX kernel: conv OIHW -> HWIO; linear [out, in] -> [in, out];
    BFL attention 1x1 conv [out, in, 1, 1] (bfl_attention=True) -> [in, out]. 1-D arrays unchanged."""
    w = np.asarray(w)
    if bfl_attention:
        return w[:, :, 0, 0].T
    if w.ndim == 4:
        return w.transpose(2, 3, 1, 0)
    if w.ndim == 2:
        return w.T
    return w


def kernel_to_torch(k: np.ndarray, bfl_attention: bool = False) -> np.ndarray:
    """Inverse of `kernel_from_torch`."""
    k = np.asarray(k)
    if bfl_attention:
        return k.T[:, :, None, None]
    if k.ndim == 4:
        return k.transpose(3, 2, 0, 1)
    if k.ndim == 2:
        return k.T
    return k
