"""The one table that maps logical axis names to mesh axes.

Models name the axes of their parameters and activations logically ("embed", "heads", ...).
Only this file knows which mesh axes those names land on. Everything that needs a sharding
(parameter placement, activation constraints, batch placement) asks `logical_to_spec`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    # Parameters.
    ("layers", None),  # stacked-block axis of scanned layers: never sharded
    ("embed", "fsdp"),  # model width: FSDP / ZeRO-3 shards it
    ("heads", "tensor"),  # attention heads: Megatron-style tensor parallel
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("qkv", None),  # the [q, k, v] axis of a fused projection
    ("mlp", "tensor"),  # SwiGLU hidden
    ("mod", "tensor"),  # adaLN modulation outputs
    ("experts", None),
    ("vocab", "tensor"),
    ("in_channels", None),
    ("text_embed", None),  # the concatenated encoder features feeding txt_in
    ("freq", None),
    ("norm", None),
    # FLUX.2 VAE convolutions (84M parameters: replicated). Kernel HWIO = (conv_kernel, conv_kernel, conv_in, conv_out).
    ("conv_kernel", None),
    ("conv_in", None),
    ("conv_out", None),
    # Activations.
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)

_ACTIVE_RULES: contextvars.ContextVar[tuple] = contextvars.ContextVar("lens_rules", default=DEFAULT_RULES)


@contextlib.contextmanager
def use_rules(rules: Iterable[tuple[str, object]]):
    """Temporarily replace the rules table (e.g. from a config override)."""
    token = _ACTIVE_RULES.set(tuple((str(k), v) for k, v in rules))
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def active_rules() -> tuple:
    return _ACTIVE_RULES.get()


def logical_to_spec(logical: Sequence[str | None] | None, mesh_axis_names: Sequence[str] | None = None) -> PartitionSpec:
    """Map a tuple of logical axis names to a PartitionSpec.

    Unknown logical names raise (a silently replicated axis is a performance bug that hides).
    Mesh axes absent from `mesh_axis_names`, or already used by an earlier dim, are dropped.
    """
    if logical is None:
        return PartitionSpec()
    table = dict(active_rules())
    used: set[str] = set()
    out = []
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rules table (lens_jax/parallel/rules.py)")
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept = tuple(a for a in axes if a not in used and (mesh_axis_names is None or a in mesh_axis_names))
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*out)


def _mesh_axis_size(mesh, entry) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    size = 1
    for n in names:
        size *= mesh.shape[n]
    return size


def named_sharding(mesh, logical, shape=None) -> NamedSharding:
    """NamedSharding for an array with these logical axes; checks divisibility when `shape` is given."""
    spec = logical_to_spec(logical, mesh.axis_names)
    if shape is not None:
        for dim, (size, entry) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
            n = _mesh_axis_size(mesh, entry)
            if size % n:
                raise ValueError(
                    f"dimension {dim} (logical {logical[dim]!r}, size {size}) does not divide over mesh axes "
                    f"{entry} of size {n}; change the mesh or the rules table"
                )
    return NamedSharding(mesh, spec)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation; a no-op when no mesh is set (single-device use)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical, mesh.axis_names)
    return jax.lax.with_sharding_constraint(x, spec)
