"""Latent codecs: images uint8 [B,H,W,3] <-> packed latents [B, H/f, W/f, C], channels-last.

The trainer and sampler only see this interface, so the pixel stand-in (space-to-depth) and the
FLUX.2 VAE codec (a later issue) are interchangeable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_unit_range(images: jax.Array) -> jax.Array:
    return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: jax.Array) -> jax.Array:
    """SPEC section 2: clamp to [-1, 1], (x + 1) * 127.5, cast (truncation, not rounding)."""
    return ((jnp.clip(x.astype(jnp.float32), -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def space_to_depth(x: jax.Array, f: int) -> jax.Array:
    """[B, H, W, C] -> [B, H/f, W/f, C*f*f] with channel index c*f*f + dy*f + dx (FLUX packing order)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // f, w // f, c * f * f)


def depth_to_space(x: jax.Array, f: int) -> jax.Array:
    b, h, w, cff = x.shape
    c = cff // (f * f)
    x = x.reshape(b, h, w, c, f, f).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * f, w * f, c)


class PixelCodec:
    """Pixels in [-1, 1] folded f x f into channels: the stand-in until the FLUX.2 VAE lands."""

    kind = "pixel"

    def __init__(self, patch: int):
        if patch <= 0:
            raise ValueError(f"config.codec.patch must be positive, got {patch}")
        self.patch = patch
        self.downsample = patch
        self.channels = 3 * patch * patch

    def _check(self, h: int, w: int):
        if h % self.patch or w % self.patch:
            raise ValueError(f"image size {w}x{h} is not a multiple of the codec patch {self.patch}")

    def encode(self, images: jax.Array) -> jax.Array:
        self._check(images.shape[1], images.shape[2])
        return space_to_depth(to_unit_range(images), self.patch)

    def decode(self, latents: jax.Array) -> jax.Array:
        return to_uint8(depth_to_space(latents, self.patch))


def make_codec(codec_cfg) -> PixelCodec:
    kind = codec_cfg.kind
    if kind == "pixel":
        return PixelCodec(int(codec_cfg.patch))
    raise ValueError(f"config.codec.kind={kind!r} is not available yet; expected 'pixel'")


# (pixels per token side, channels per token) of each codec, known without building it.
def codec_geometry(codec_cfg) -> tuple[int, int]:
    if codec_cfg.kind == "pixel":
        return int(codec_cfg.patch), 3 * int(codec_cfg.patch) ** 2
    if codec_cfg.kind == "flux2":
        return 16, 128  # 8x VAE downsampling, then 2x2 patches of 32 latent channels
    raise ValueError(f"config.codec.kind={codec_cfg.kind!r}; expected 'pixel' or 'flux2'")
