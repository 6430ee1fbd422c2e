"""The frozen text encoder of a run: its config, its weights (seeded random or restored), its shardings."""

from __future__ import annotations

import pathlib

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from lens_jax.models.abstract import abstract_module
from lens_jax.models.gpt_oss import GptOssConfig, GptOssEncoder
from lens_jax.parallel.placement import state_shardings


def encoder_config(te_cfg) -> GptOssConfig:
    return GptOssConfig.from_dict(te_cfg.model)


def abstract_encoder(cfg: GptOssConfig):
    return abstract_module(lambda: GptOssEncoder(cfg, rngs=nnx.Rngs(0)))


def load_text_encoder(te_cfg, mesh: Mesh, save_dir: str | pathlib.Path | None = None):
    """(graphdef, params, shardings). With `weights=''` the weights are seeded random, created directly
    in their shardings and saved once to `save_dir` so that later tools (sampling, export) see the
    very same encoder; otherwise they are restored from the Orbax directory `weights`."""
    cfg = encoder_config(te_cfg)
    graphdef, abstract = abstract_encoder(cfg)
    shardings = state_shardings(abstract, mesh)
    source = pathlib.Path(te_cfg.weights).absolute() if te_cfg.weights else None
    saved = pathlib.Path(save_dir).absolute() if save_dir else None
    if source is None and saved is not None and saved.exists():
        source = saved
    # Every process must take the same branch (the save below is collective): decide, then sync.
    multihost_utils.sync_global_devices("lens_jax.load_text_encoder")
    if source is not None:
        if not source.exists():
            raise FileNotFoundError(f"config.text_encoder.weights: {source} does not exist")
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        params = ocp.StandardCheckpointer().restore(source, target)
        return graphdef, params, shardings

    seed = int(te_cfg.seed)
    params = jax.jit(lambda: nnx.state(GptOssEncoder(cfg, rngs=nnx.Rngs(seed)), nnx.Param), out_shardings=shardings)()
    if saved is not None:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(saved, params)
        ckptr.wait_until_finished()
    return graphdef, params, shardings
