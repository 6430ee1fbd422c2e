"""Latent codecs: images uint8 [B,H,W,3] <-> packed latents [B, H/f, W/f, C], channels-last.

The trainer and sampler only see this interface, so the pixel stand-in (space-to-depth) and the
FLUX.2 VAE codec (`Flux2Codec`) are interchangeable.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx


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


@jax.tree_util.register_pytree_node_class
class PixelCodec:
    """Pixels in [-1, 1] folded f x f into channels. A pytree without leaves, so that either codec can
    travel as an argument of a jitted step."""

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

    def tree_flatten(self):
        return (), self.patch

    @classmethod
    def tree_unflatten(cls, patch, children):
        return cls(patch)


def _cfg_field(cfg, name: str, default=None):
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def flux2_vae_config(codec_cfg):
    """The Flux2VAEConfig of a 'flux2' codec config: `codec_cfg.vae` (a dict of Flux2VAEConfig fields;
    missing or empty = the real FLUX.2 VAE)."""
    from lens_jax.models.flux2_vae import Flux2VAEConfig

    vae = _cfg_field(codec_cfg, "vae", None)
    if hasattr(vae, "to_dict"):
        vae = vae.to_dict()
    return Flux2VAEConfig.from_dict(vae or {})


@jax.tree_util.register_pytree_node_class
class Flux2Codec:
    """FLUX.2 latents: the VAE posterior mean, 2x2-patchified to 4*latent channels, batch-norm normalised.

    encode: uint8 [B,H,W,3] -> [-1,1] -> VAE encode -> mean (mode) -> patchify (channel c*4 + dy*2 + dx)
            -> (z - running_mean) / sqrt(running_var + eps) -> float32 [B, H/16, W/16, 128].
    decode: the exact inverse (z * sqrt(var + eps) + mean, unpatchify, VAE decode) -> to_uint8.

    Pure: it holds the VAE as (graphdef, state), the state being every Variable (Params and the two
    BatchStats) as arrays, and merges them inside jitted functions. The codec is itself a pytree (leaves:
    the state), so pass it as an argument to a jitted step to keep the 84M weights out of the compiled
    program as constants; closing over it also works. Called outside jit, encode/decode run compiled.
    """

    kind = "flux2"

    def __init__(self, vae, state=None, *, cfg=None):
        from lens_jax.models.flux2_vae import Flux2VAE

        if isinstance(vae, Flux2VAE):
            if state is not None:
                raise ValueError("Flux2Codec(module) takes no separate state")
            cfg = vae.cfg
            vae, state = nnx.split(vae)
        elif state is None:
            raise ValueError("Flux2Codec(graphdef, state): the VAE state is required")
        elif cfg is None:
            cfg = nnx.merge(vae, state).cfg
        self.graphdef, self.state, self.cfg = vae, state, cfg
        self.downsample = cfg.downsample
        self.channels = cfg.packed_channels

    def tree_flatten(self):
        return (self.state,), (self.graphdef, self.cfg)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.graphdef, obj.cfg = aux
        (obj.state,) = children
        obj.downsample = obj.cfg.downsample
        obj.channels = obj.cfg.packed_channels
        return obj

    def _check(self, h: int, w: int):
        f = self.downsample
        if h % f or w % f:
            raise ValueError(f"image size {w}x{h} (WxH) is not a multiple of the flux2 codec's {f} pixels per token")

    def encode(self, images: jax.Array) -> jax.Array:
        self._check(images.shape[1], images.shape[2])
        return _flux2_encode(self.graphdef, self.state, images)

    def decode_float(self, latents: jax.Array) -> jax.Array:
        """Packed latents -> VAE output in about [-1, 1] (float, not clamped)."""
        return _flux2_decode(self.graphdef, self.state, latents)

    def decode(self, latents: jax.Array) -> jax.Array:
        return to_uint8(self.decode_float(latents))


def flux2_bn_stats(vae) -> tuple[jax.Array, jax.Array]:
    """(mean, std) of the packed-latent normalisation, float32 [4*latent]: std = sqrt(running_var + eps)."""
    mean = vae.bn_running_mean[...].astype(jnp.float32)
    std = jnp.sqrt(vae.bn_running_var[...].astype(jnp.float32) + vae.cfg.batch_norm_eps)
    return mean, std


@functools.partial(jax.jit, static_argnums=0)
def _flux2_encode(graphdef, state, images):
    vae = nnx.merge(graphdef, state)
    mean, _ = vae.encode(to_unit_range(images))
    z = space_to_depth(mean.astype(jnp.float32), 2)
    m, s = flux2_bn_stats(vae)
    return (z - m) / s


@functools.partial(jax.jit, static_argnums=0)
def _flux2_decode(graphdef, state, latents):
    vae = nnx.merge(graphdef, state)
    m, s = flux2_bn_stats(vae)
    z = depth_to_space(latents.astype(jnp.float32) * s + m, 2)
    return vae.decode(z)


def make_codec(codec_cfg, vae_state=None) -> "PixelCodec | Flux2Codec":
    """The codec a config names. 'flux2' needs the VAE weights: `vae_state` is a Flux2VAE module or its
    full nnx.State (Params and BatchStats, e.g. `nnx.split(vae)[1]` or a restored checkpoint), shaped as
    `codec_cfg.vae` says."""
    kind = codec_cfg.kind
    if kind == "pixel":
        return PixelCodec(int(codec_cfg.patch))
    if kind == "flux2":
        from lens_jax.models.flux2_vae import Flux2VAE, abstract_flux2_vae

        cfg = flux2_vae_config(codec_cfg)
        if vae_state is None:
            raise ValueError("config.codec.kind='flux2' needs the VAE weights: make_codec(codec_cfg, vae_state=...)")
        if isinstance(vae_state, Flux2VAE):
            if vae_state.cfg != cfg:
                raise ValueError(f"the Flux2VAE given has config {vae_state.cfg}, but config.codec.vae says {cfg}")
            return Flux2Codec(vae_state)
        graphdef, abstract = abstract_flux2_vae(cfg)
        want = {p: tuple(v.shape) for p, v in nnx.to_flat_state(abstract)}
        got = {p: tuple(jnp.shape(v[...] if isinstance(v, nnx.Variable) else v)) for p, v in nnx.to_flat_state(vae_state)}
        if want != got:
            missing = sorted(".".join(map(str, p)) for p in want.keys() - got.keys())
            extra = sorted(".".join(map(str, p)) for p in got.keys() - want.keys())
            shapes = sorted(".".join(map(str, p)) for p in want.keys() & got.keys() if want[p] != got[p])
            raise ValueError(f"VAE state does not match config.codec.vae: missing {missing[:5]}, unexpected "
                             f"{extra[:5]}, wrong shape {shapes[:5]}")
        return Flux2Codec(graphdef, vae_state, cfg=cfg)
    raise ValueError(f"config.codec.kind={kind!r}; expected 'pixel' or 'flux2'")


# (pixels per token side, channels per token) of each codec, known without building it.
def codec_geometry(codec_cfg) -> tuple[int, int]:
    if codec_cfg.kind == "pixel":
        return int(codec_cfg.patch), 3 * int(codec_cfg.patch) ** 2
    if codec_cfg.kind == "flux2":
        cfg = flux2_vae_config(codec_cfg)  # default: 8x VAE downsampling, then 2x2 patches of 32 channels
        return cfg.downsample, cfg.packed_channels
    raise ValueError(f"config.codec.kind={codec_cfg.kind!r}; expected 'pixel' or 'flux2'")
