"""The train state: a pytree of arrays (params, optimizer state, step, EMA), never Python objects."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from lens_jax.models.abstract import abstract_module
from lens_jax.models.dit import DiTConfig, LensDiT
from lens_jax.parallel.placement import replicated, state_shardings


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of the DiT's Params (float32 master weights)
    opt_state: Any
    ema: Any  # same tree as params, or None when EMA is off


def abstract_dit(dit_cfg: DiTConfig):
    return abstract_module(lambda: LensDiT(dit_cfg, rngs=nnx.Rngs(0)))


def train_state_shardings(abstract_params, tx: optax.GradientTransformation, mesh: Mesh, use_ema: bool) -> TrainState:
    """Shardings of every leaf: params by the rules, Adam moments like their params, scalars replicated."""
    param_sh = state_shardings(abstract_params, mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = optax.tree_map_params(
        tx, lambda _, sh: sh, abstract_opt, param_sh, transform_non_params=lambda _: replicated(mesh)
    )
    return TrainState(step=replicated(mesh), params=param_sh, opt_state=opt_sh, ema=param_sh if use_ema else None)


def init_train_state(dit_cfg: DiTConfig, tx, seed: int, shardings: TrainState, use_ema: bool) -> TrainState:
    """Create the state directly in its shardings (no device ever holds the whole model)."""

    @jax.jit
    def init():
        params = nnx.state(LensDiT(dit_cfg, rngs=nnx.Rngs(seed)), nnx.Param)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema=jax.tree.map(jnp.copy, params) if use_ema else None,
        )

    return jax.jit(init, out_shardings=shardings)()


def abstract_train_state(abstract_params, tx, shardings: TrainState, use_ema: bool) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings: the restore target for Orbax."""
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=abstract_params,
        opt_state=jax.eval_shape(tx.init, abstract_params),
        ema=abstract_params if use_ema else None,
    )
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
