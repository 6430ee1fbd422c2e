"""Shardings of model states from their logical annotations, and host batches as global arrays."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lens_jax.parallel.rules import logical_to_spec, named_sharding


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def state_shardings(abstract_state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedSharding per variable, from the logical axes it was created with, through the rules."""
    logical = nnx.get_partition_spec(abstract_state)
    return jax.tree.map(
        lambda spec, leaf: named_sharding(mesh, tuple(spec), leaf.shape),
        logical,
        abstract_state,
        is_leaf=_is_spec,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("act_batch",) + (None,) * (ndim - 1), mesh.axis_names))


def host_batch_to_global(batch: Mapping[str, Any], mesh: Mesh) -> dict:
    """This process's slice of the batch (numpy) -> global arrays sharded over data x fsdp.

    Every process passes its own rows; the global batch is their concatenation in process order.
    """
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in batch.items()
    }
