"""Device meshes built from config sizes, and the placement of host batches on them."""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
from jax.sharding import AxisType, Mesh

from lens_jax.parallel.rules import MESH_AXES


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve config sizes (one may be -1: fill the rest) against the device count."""
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown} in config.mesh; axes are {MESH_AXES}")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    fills = [a for a, s in zip(MESH_AXES, shape) if s == -1]
    if len(fills) > 1:
        raise ValueError(f"config.mesh: only one axis may be -1, got {fills}")
    for a, s in zip(MESH_AXES, shape):
        if s == 0 or s < -1:
            raise ValueError(f"config.mesh.{a}={s} must be a positive size or -1")
    known = math.prod(s for s in shape if s != -1)
    if fills:
        if num_devices % known:
            raise ValueError(
                f"config.mesh: the fixed axes ({dict(zip(MESH_AXES, shape))}) multiply to {known}, which does not "
                f"divide the {num_devices} devices, so mesh.{fills[0]}=-1 cannot fill the rest"
            )
        shape[MESH_AXES.index(fills[0])] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, shape))} has {known} devices but {num_devices} are available; "
            f"set one axis to -1 or make the product {num_devices}"
        )
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(dict(sizes), len(devices))
    # Auto axes: sharding follows the annotations and XLA propagates the rest (see TOOLCHAIN.md).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
