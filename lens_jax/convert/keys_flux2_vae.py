"""FLUX.2 VAE keys <-> NNX paths of lens_jax.models.flux2_vae.Flux2VAE (the table in its docstring).

The table is computed from the module's own helpers: `diffusers_key(path)` / `bfl_key(path, n_up)`
name the tensor of every NNX variable, `kernel_from_torch` / `kernel_to_torch` transform the kernels
(conv OIHW <-> HWIO, linear [out, in] <-> [in, out], BFL attention 1x1 convs [out, in, 1, 1] <->
[in, out]); scales, biases and the two batch-norm statistics are copied. `bn.num_batches_tracked`
(int64 scalar) is dropped on import (its value is kept in lens_jax.json) and written back on export.

Formats: 'diffusers' (AutoencoderKLFlux2, `vae/config.json` + `diffusion_pytorch_model.safetensors`)
and 'bfl' (Black Forest Labs' `ae.safetensors`, no config.json: the FLUX.2 shape is assumed unless
one is given).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import nnx

from lens_jax.convert.common import ConvertError, Entry, Target, plain_entry

FORMATS = ("diffusers", "bfl")
NUM_BATCHES_TRACKED = "bn.num_batches_tracked"


def detect_format(keys) -> str:
    keys = list(keys)
    if any(k.startswith("encoder.down.") or k.startswith("decoder.up.") for k in keys):
        return "bfl"
    if any(k.startswith("encoder.down_blocks.") for k in keys):
        return "diffusers"
    raise ConvertError(f"not a FLUX.2 VAE checkpoint: first keys {sorted(keys)[:5]}")


def config_from_json(c: Mapping[str, Any] | None, **overrides):
    from lens_jax.models.flux2_vae import Flux2VAEConfig

    try:
        if c is None:
            return Flux2VAEConfig.flux2(**overrides)
        return Flux2VAEConfig.from_diffusers_config(c, **overrides)
    except ValueError as e:
        raise ConvertError(f"flux2-vae config.json: {e}") from None


def diffusers_config(cfg, base: Mapping[str, Any] | None = None) -> dict:
    n, m = len(cfg.block_out_channels), len(cfg.decoder_channels)
    out = dict(base or {})
    out.setdefault("_class_name", "AutoencoderKLFlux2")
    out.update(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * m,
        block_out_channels=list(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        act_fn=out.get("act_fn", "silu"),
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        use_quant_conv=cfg.use_quant_conv,
        use_post_quant_conv=cfg.use_post_quant_conv,
        mid_block_add_attention=cfg.mid_block_add_attention,
        batch_norm_eps=cfg.batch_norm_eps,
        patch_size=[2, 2],
    )
    if cfg.decoder_block_out_channels is not None:
        out["decoder_block_out_channels"] = list(cfg.decoder_block_out_channels)
    return out


def _kernel_entry(key, nnx_shape, target, bfl_attention: bool) -> Entry:
    from lens_jax.models.flux2_vae import kernel_from_torch, kernel_to_torch

    if bfl_attention:
        torch_shape = (nnx_shape[1], nnx_shape[0], 1, 1)
    elif len(nnx_shape) == 4:
        torch_shape = (nnx_shape[3], nnx_shape[2], nnx_shape[0], nnx_shape[1])
    elif len(nnx_shape) == 2:
        torch_shape = (nnx_shape[1], nnx_shape[0])
    else:
        torch_shape = tuple(nnx_shape)
    return Entry((key,), (torch_shape,), (target,),
                 lambda a: [np.ascontiguousarray(kernel_from_torch(a[0], bfl_attention))],
                 lambda a: [np.ascontiguousarray(kernel_to_torch(a[0], bfl_attention))])


def entries(cfg, fmt: str) -> list[Entry]:
    from lens_jax.models.flux2_vae import abstract_flux2_vae, bfl_key, diffusers_key

    if fmt not in FORMATS:
        raise ConvertError(f"unknown flux2-vae format {fmt!r}; expected one of {FORMATS}")
    _, abstract = abstract_flux2_vae(cfg)
    n_up = len(cfg.decoder_channels)
    out = []
    for path, var in nnx.to_flat_state(abstract):
        names = [str(p) for p in path]
        shape = tuple(var.get_value().shape)
        key = diffusers_key(names) if fmt == "diffusers" else bfl_key(names, n_up)
        target = Target(tuple(path))
        if names[-1] == "kernel":
            out.append(_kernel_entry(key, shape, target, fmt == "bfl" and "attentions" in names))
        else:
            out.append(plain_entry(key, shape, target))
    return out
