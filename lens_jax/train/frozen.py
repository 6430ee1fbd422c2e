"""The frozen latent codec of a run: the pixel stand-in, or the FLUX.2 VAE with seeded random or
converted weights (the text encoder's counterpart is lens_jax/text/encoder.py)."""

from __future__ import annotations

import pathlib

import jax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from lens_jax.convert.checkpoint_io import is_converted, load_converted, read_meta, save_converted
from lens_jax.models.codec import flux2_vae_config, make_codec
from lens_jax.parallel.placement import replicated


def load_codec(codec_cfg, mesh: Mesh, save_dir: str | pathlib.Path | None = None):
    """The codec `config.codec` names. For 'flux2', weights come from `codec.weights` (a directory
    written by `python -m lens_jax.convert import --kind flux2-vae`), else they are seeded random
    (`codec.seed`) and saved once to `save_dir` in the same layout, so later tools decode with the
    very same VAE. The VAE is small (84M): it is replicated on every device."""
    if codec_cfg.kind != "flux2":
        return make_codec(codec_cfg)
    cfg = flux2_vae_config(codec_cfg)
    source = pathlib.Path(codec_cfg.weights).absolute() if codec_cfg.weights else None
    saved = pathlib.Path(save_dir).absolute() if save_dir else None
    if source is None and saved is not None and is_converted(saved):
        source = saved
    multihost_utils.sync_global_devices("lens_jax.load_codec")  # every process takes the same branch
    if source is not None:
        meta = read_meta(source)
        if meta.get("kind") != "flux2-vae":
            raise ValueError(f"config.codec.weights: {source} holds a converted {meta.get('kind')!r}, not a flux2-vae")
        _, _, state = load_converted(source, mesh)
        state = jax.device_put(state, replicated(mesh))
        return make_codec(codec_cfg, vae_state=state)

    from lens_jax.models.flux2_vae import Flux2VAE

    seed = int(codec_cfg.seed)
    state = jax.jit(lambda: nnx.state(Flux2VAE(cfg, rngs=nnx.Rngs(seed))), out_shardings=replicated(mesh))()
    if saved is not None:
        meta = {
            "kind": "flux2-vae",
            "config": cfg.to_dict(),
            "extras": {},
            "param_dtypes": {".".join(map(str, p)): "float32" for p, _ in nnx.to_flat_state(state)},
            "source": {"format": "random", "seed": seed},
        }
        save_converted(saved, meta, state, overwrite=True)
    return make_codec(codec_cfg, vae_state=state)
