"""Abstract (shape-only) models: the graphdef and Param shapes of a module, allocating nothing."""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx


def abstract_module(build: Callable[[], nnx.Module]) -> tuple[Any, nnx.State]:
    """(graphdef, Param state of ShapeDtypeStructs keeping their logical-axis metadata).

    jax.eval_shape rather than nnx.eval_shape: the latter attaches shardings from the raw logical
    names whenever a mesh is active, before the rules table (lens_jax/parallel/rules.py) maps them.
    """
    box = []

    def params():
        graphdef, state = nnx.split(build(), nnx.Param)
        box.append(graphdef)
        return state

    state = jax.eval_shape(params)
    return box[0], state


def param_count(build: Callable[[], nnx.Module]) -> int:
    return int(sum(x.size for x in jax.tree.leaves(abstract_module(build)[1])))
