"""The frozen text encoder of a run: its config, its weights (seeded random or restored), its shardings.

Weights live in a converted-checkpoint directory (lens_jax.convert: DIR/lens_jax.json +
DIR/checkpoints/<step>/ with state = {'params': ...}), the same layout `python -m lens_jax.convert
import --kind gpt-oss` writes and `--config.init_from` reads; they are restored with
`restore_params_only`, straight into their shardings on the mesh.
"""

from __future__ import annotations

import pathlib

import jax
from jax.experimental import multihost_utils
from flax import nnx
from jax.sharding import Mesh

from lens_jax.convert.checkpoint_io import is_converted
from lens_jax.models.abstract import abstract_module
from lens_jax.models.gpt_oss import GptOssConfig, GptOssEncoder
from lens_jax.parallel.placement import state_shardings


def encoder_config(te_cfg) -> GptOssConfig:
    return GptOssConfig.from_dict(te_cfg.model)


def abstract_encoder(cfg: GptOssConfig):
    return abstract_module(lambda: GptOssEncoder(cfg, rngs=nnx.Rngs(0)))


def check_converted_config(source: pathlib.Path, cfg: GptOssConfig) -> None:
    """A converted gpt-oss directory must hold the model config.text_encoder.model describes."""
    from lens_jax.convert.checkpoint_io import read_meta
    from lens_jax.convert.keys_gpt_oss import model_fields

    meta = read_meta(source)
    if meta.get("kind") != "gpt-oss":
        raise ValueError(f"config.text_encoder.weights: {source} holds a converted {meta.get('kind')!r}, not a gpt-oss")
    stored = model_fields(GptOssConfig.from_dict(meta["config"]))
    wanted = model_fields(cfg)
    diff = {k: (wanted[k], stored[k]) for k in wanted if wanted[k] != stored[k]}
    if diff:
        detail = ", ".join(f"{k}: config {a!r} vs weights {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"config.text_encoder.model does not match the weights in {source} ({detail}); "
                         f"copy the fields from {source / 'lens_jax.json'}")


def restore_encoder_weights(source: pathlib.Path, cfg: GptOssConfig, target):
    """Params of `source` (a converted gpt-oss dir, or a workdir's checkpoints) into the shardings of `target`."""
    from lens_jax.train.checkpoint import restore_params_only

    if is_converted(source):
        check_converted_config(source, cfg)
    return restore_params_only(source, target)


def load_text_encoder(te_cfg, mesh: Mesh, save_dir: str | pathlib.Path | None = None):
    """(graphdef, params, shardings). With `weights=''` the weights are seeded random, created directly
    in their shardings and saved once to `save_dir` (as a converted gpt-oss directory) so that later
    tools (sampling, export) see the very same encoder; otherwise they are restored from the converted
    directory `weights`."""
    cfg = encoder_config(te_cfg)
    graphdef, abstract = abstract_encoder(cfg)
    shardings = state_shardings(abstract, mesh)
    source = pathlib.Path(te_cfg.weights).absolute() if te_cfg.weights else None
    saved = pathlib.Path(save_dir).absolute() if save_dir else None
    if source is None and saved is not None and is_converted(saved):
        source = saved
    # Every process must take the same branch (the save below is collective): decide, then sync.
    multihost_utils.sync_global_devices("lens_jax.load_text_encoder")
    if source is not None:
        if not source.exists():
            raise FileNotFoundError(f"config.text_encoder.weights: {source} does not exist")
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        params = restore_encoder_weights(source, cfg, target)
        return graphdef, params, shardings

    seed = int(te_cfg.seed)
    params = jax.jit(lambda: nnx.state(GptOssEncoder(cfg, rngs=nnx.Rngs(seed)), nnx.Param), out_shardings=shardings)()
    if saved is not None:
        from lens_jax.convert.checkpoint_io import save_converted

        meta = {
            "kind": "gpt-oss",
            "config": cfg.to_dict(),
            "extras": {"include_lm_head": False},
            "param_dtypes": {".".join(map(str, p)): "float32" for p, _ in nnx.to_flat_state(abstract)},
            "source": {"format": "random", "seed": seed},
        }
        save_converted(saved, meta, params, overwrite=True)
    return graphdef, params, shardings
