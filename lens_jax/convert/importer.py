"""PyTorch-layout safetensors -> a converted lens_jax directory, streamed tensor by tensor.

Every key, shape and dtype is checked against the key table before any data is read. Then, one
group of NNX parameters at a time (a group = parameters filled by the same entries, e.g. q/k/v from
a fused `qkv`), each stacked array is created in its sharding on the mesh and filled slot by slot
from the memory-mapped files (a donated in-place update per layer slice), so the host holds one
layer slice at a time beside the arrays already placed. The Orbax save then streams them to disk.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lens_jax.convert import checkpoint_io, mxfp4
from lens_jax.convert.common import ConvertError, Entry, dtype_name, fmt_shape, np_dtype, promote
from lens_jax.convert.kinds import Kind, Spec, get_kind, read_json
from lens_jax.convert.safetensors_io import DTYPE_NAMES, SafetensorsCheckpoint, save_file

FLOAT_ST = ("F32", "F16", "BF16")


def resolve_src(kind: Kind, src) -> tuple[pathlib.Path, pathlib.Path | None]:
    """(the component folder or file, the pipeline root when `src` is a whole pipeline folder)."""
    src = pathlib.Path(src).absolute()
    if not src.exists():
        raise ConvertError(f"--src {src} does not exist")
    if src.is_dir() and (src / kind.subfolder).is_dir() and (
        (src / "model_index.json").exists() or not list(src.glob("*.safetensors"))
    ):
        return src / kind.subfolder, src
    return src, None


def _component_config(path: pathlib.Path) -> dict | None:
    folder = path if path.is_dir() else path.parent
    return read_json(folder / "config.json")


@dataclasses.dataclass
class Stored:
    """How one logical key is held by the source checkpoint."""

    key: str
    pair: mxfp4.Pair | None  # MXFP4 storage, or None for a plain tensor


def plan_storage(spec: Spec, reader: SafetensorsCheckpoint) -> dict[str, Stored]:
    """Check keys, shapes and dtypes of the checkpoint against the table; name every culprit."""
    stored: dict[str, Stored] = {}
    expected: dict[str, tuple] = {}
    for e in spec.entries:
        for key, shape in zip(e.keys, e.shapes):
            pair = spec.pairs.get(key)
            if pair is not None and pair.blocks in reader:
                bshape, sshape = pair.stored_shapes(shape)
                expected[pair.blocks] = (bshape, ("U8",), f"MXFP4 blocks of {key} {fmt_shape(shape)}")
                expected[pair.scales] = (sshape, ("U8",), f"MXFP4 scales of {key} {fmt_shape(shape)}")
                stored[key] = Stored(key, pair)
            else:
                expected[key] = (tuple(shape), FLOAT_ST, None)
                stored[key] = Stored(key, None)
    keys = set(reader.keys())
    missing = [k for k in expected if k not in keys]
    unexpected = sorted(keys - set(expected) - set(spec.dropped))
    problems = []
    if missing:
        problems.append(f"missing key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    if unexpected:
        problems.append(f"unexpected key(s) {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} in all)")
    for key, (shape, dtypes, what) in expected.items():
        if key not in keys:
            continue
        info = reader.info(key)
        if tuple(info.shape) != tuple(shape):
            problems.append(f"{key}: checkpoint shape {fmt_shape(info.shape)} but the config implies {fmt_shape(shape)}"
                            + (f" ({what})" if what else ""))
        elif info.st_dtype not in dtypes:
            problems.append(f"{key}: dtype {info.st_dtype}, expected one of {list(dtypes)}")
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise ConvertError(f"{spec.kind} checkpoint {reader.root} does not match its config "
                           f"({describe(spec)}):\n  " + "\n  ".join(problems[:12]) + more)
    return stored


def describe(spec: Spec) -> str:
    c = spec.config
    if spec.kind == "lens-dit":
        return (f"num_layers={c.num_layers}, heads={c.num_attention_heads}x{c.attention_head_dim}, "
                f"in_channels={c.in_channels}, proj_out={c.out_channels}, enc_hidden_dim={c.enc_hidden_dim}, "
                f"text layers={c.num_text_layers}, mlp={c.mlp_dim}")
    if spec.kind == "gpt-oss":
        return (f"{spec.fmt} layout, layers={c.num_hidden_layers}, hidden={c.hidden_size}, heads={c.num_attention_heads}/"
                f"{c.num_key_value_heads}x{c.head_dim}, experts={c.num_local_experts}, intermediate={c.intermediate_size}, "
                f"vocab={c.vocab_size}")
    if spec.kind == "flux2-vae":
        return (f"{spec.fmt} layout, block_out_channels={list(c.block_out_channels)}, "
                f"decoder={list(c.decoder_channels)}, layers_per_block={c.layers_per_block}, latent={c.latent_channels}")
    return spec.kind


def group_entries(entries: Sequence[Entry]) -> list[tuple[list[tuple], list[Entry]]]:
    """Connected groups of (NNX paths, entries): entries sharing a path land in one group."""
    parent: dict[tuple, tuple] = {}

    def find(p):
        while parent.setdefault(p, p) != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for e in entries:
        ps = e.paths
        for p in ps[1:]:
            parent[find(p)] = find(ps[0])
        find(ps[0])
    groups: dict[tuple, tuple[list, list]] = {}
    for e in entries:
        root = find(e.paths[0])
        paths, es = groups.setdefault(root, ([], []))
        for p in e.paths:
            if p not in paths:
                paths.append(p)
        es.append(e)
    return list(groups.values())


def check_coverage(entries: Sequence[Entry], flat_abstract: Mapping[tuple, Any]) -> None:
    """Every NNX param is written exactly once in full (whole, or every slot of its leading axis)."""
    seen: dict[tuple, list] = {p: [] for p in flat_abstract}
    for e in entries:
        for t in e.targets:
            if t.path not in seen:
                raise ConvertError(f"key table error: {e.keys} targets {'.'.join(map(str, t.path))}, not a parameter of the model")
            seen[t.path].append(t.index)
    for p, idx in seen.items():
        shape = flat_abstract[p].shape
        ok = idx == [None] or (None not in idx and sorted(idx) == list(range(shape[0])))
        if not ok:
            raise ConvertError(f"key table error: parameter {'.'.join(map(str, p))} {fmt_shape(shape)} is covered by slots {idx}")


# ----------------------------------------------------------------------------------------------
# placing arrays


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _update_fn(sharding, slot_sharding):
    def update(buf, x, i):
        return jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, 0)

    return jax.jit(update, in_shardings=(sharding, slot_sharding, None), out_shardings=sharding, donate_argnums=0)


class Builder:
    """One NNX array: whole (device_put) or slot by slot into a device buffer updated in place."""

    def __init__(self, path, shape, dtype, sharding: NamedSharding):
        self.path, self.shape, self.dtype, self.sharding = path, tuple(shape), np.dtype(dtype), sharding
        self.buf = None
        self.filled: set = set()

    def put(self, index, value: np.ndarray, key: str):
        want = self.shape if index is None else self.shape[1:]
        if tuple(value.shape) != want:
            raise ConvertError(f"{key}: gives {'.'.join(map(str, self.path))}{'' if index is None else f'[{index}]'} the shape "
                               f"{fmt_shape(value.shape)}, expected {fmt_shape(want)}")
        if index is None:
            self.buf = jax.device_put(np.asarray(value, self.dtype), self.sharding)
            self.filled.add(None)
            return
        if self.buf is None:
            self.buf = _zeros_fn(self.shape, self.dtype, self.sharding)()
        spec = tuple(self.sharding.spec) + (None,) * (len(self.shape) - len(self.sharding.spec))
        slot = NamedSharding(self.sharding.mesh, PartitionSpec(*spec[1:]))
        # cast on the host: the device program then moves the narrow dtype
        self.buf = _update_fn(self.sharding, slot)(self.buf, np.asarray(value, self.dtype), np.int32(index))
        self.filled.add(index)

    def finish(self) -> jax.Array:
        self.buf.block_until_ready()
        return self.buf


def _read_logical(reader: SafetensorsCheckpoint, s: Stored, scales_out: dict | None, dtype) -> np.ndarray:
    if s.pair is None:
        return reader.read(s.key)
    scales = reader.read(s.pair.scales)
    if scales_out is not None:
        scales_out[s.key] = scales
    return s.pair.decode(reader.read(s.pair.blocks), scales, dtype)


def import_checkpoint(kind: str, src, dst, *, dtype: str = "keep", selected_layers: Sequence[int] | None = None,
                      config=None, overwrite: bool = False, mesh=None,
                      log: Callable[[str], None] | None = print) -> pathlib.Path:
    """Convert `src` (a component folder / file, or a whole pipeline folder) into the directory `dst`.

    `config`: a config.json path (or dict) to use instead of the one next to the weights (e.g. for a
    BFL `ae.safetensors`, which has none)."""
    t0 = time.perf_counter()
    k = get_kind(kind)
    if dtype != "keep":
        dtype = dtype_name(dtype)
    folder, pipeline = resolve_src(k, src)
    options: dict = {}
    if selected_layers:
        options["selected_layers"] = list(selected_layers)
    elif pipeline is not None and k.name == "gpt-oss":
        dit_cfg = read_json(pipeline / "transformer" / "config.json")
        if dit_cfg and dit_cfg.get("selected_layer_index"):
            options["selected_layers"] = list(dit_cfg["selected_layer_index"])
    dst = pathlib.Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst} already exists; choose another --dst or pass --overwrite")

    with SafetensorsCheckpoint(folder, prefer=k.prefer()) as reader:
        if config is None:
            config_json = _component_config(folder)
        elif isinstance(config, Mapping):
            config_json = dict(config)
        else:
            config_json = read_json(pathlib.Path(config))
            if config_json is None:
                raise ConvertError(f"--config {config} does not exist")
        spec = k.source_spec(folder, reader.keys(), config_json, options)
        stored = plan_storage(spec, reader)
        dropped = {key: reader.read(key).tolist() for key in spec.dropped if key in reader}
        if dropped:
            spec.extras["dropped"] = dropped
        graphdef, abstract = k.abstract(spec)
        flat_abstract = {p: v.get_value() for p, v in nnx.to_flat_state(abstract)}
        check_coverage(spec.entries, flat_abstract)

        from lens_jax.parallel.mesh import make_mesh
        from lens_jax.parallel.placement import state_shardings

        if mesh is not None:
            placed = state_shardings(abstract, mesh)
        else:  # every local device on 'fsdp' (only where placement happens; the files do not depend on it)
            try:
                placed = state_shardings(abstract, make_mesh({"data": 1, "fsdp": -1, "tensor": 1}))
            except ValueError:  # sizes that do not split over the devices: one device is enough for small models
                placed = state_shardings(abstract, make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
        shardings = dict(nnx.to_flat_state(placed))
        shardings = {p: (s.get_value() if hasattr(s, "get_value") else s) for p, s in shardings.items()}

        src_dtypes = {}  # logical key -> dtype name
        for key, s in stored.items():
            src_dtypes[key] = "bfloat16" if s.pair is not None else DTYPE_NAMES[reader.info(key).dtype]
        param_dtypes = {}
        for e in spec.entries:
            for t in e.targets:
                param_dtypes.setdefault(t.path, []).extend(src_dtypes[key] for key in e.keys)
        param_dtypes = {p: (promote(v) if dtype == "keep" else dtype_name(dtype)) for p, v in param_dtypes.items()}

        is_mx = any(s.pair is not None for s in stored.values())
        sidecar: dict[str, np.ndarray] = {}
        arrays: dict[tuple, jax.Array] = {}
        for paths, entries in group_entries(spec.entries):
            builders = {p: Builder(p, flat_abstract[p].shape, np_dtype(param_dtypes[p]), shardings[p]) for p in paths}
            for e in entries:
                scales: dict | None = {} if is_mx else None
                dt = builders[e.targets[0].path].dtype  # MXFP4 entries have a single target
                values = [_read_logical(reader, stored[key], scales, dt) for key in e.keys]
                outs = e.to_nnx(values)
                del values
                for t, a in zip(e.targets, outs):
                    builders[t.path].put(t.index, a, e.keys[0])
                if scales:  # MXFP4 entries are one key -> one target
                    (t,) = e.targets
                    sidecar[scales_key(t)] = scales[e.keys[0]]
                del outs
            for p, b in builders.items():
                arrays[p] = b.finish()

        state = nnx.from_flat_state([(p, v.replace(arrays[p])) for p, v in nnx.to_flat_state(abstract)])
        meta = {
            "kind": spec.kind,
            "config": spec.config_dict,
            "extras": spec.extras,
            "param_dtypes": {".".join(map(str, p)): d for p, d in param_dtypes.items()},
            "source": {
                "path": str(folder),
                "format": spec.fmt,
                "mxfp4": is_mx,
                "config": config_json,
                "dtypes": {key: ("mxfp4" if s.pair is not None else src_dtypes[key]) for key, s in stored.items()},
            },
        }
        extra = {checkpoint_io.SCALES_SIDECAR: (lambda path: save_file(path, sidecar))} if sidecar else None
        out = checkpoint_io.save_converted(dst, meta, state, overwrite=overwrite, extra_files=extra)
    if log:
        n = sum(int(np.prod(a.shape)) for a in arrays.values())
        log(f"imported {spec.kind} ({spec.fmt}{', MXFP4 experts' if is_mx else ''}) from {folder}: "
            f"{len(stored)} tensors, {n:,} parameters -> {out} in {time.perf_counter() - t0:.1f}s")
    return out


def scales_key(t) -> str:
    """Sidecar key of the MXFP4 scales that filled target `t` ('layers.gate_up_proj.3')."""
    return ".".join(map(str, t.path)) + ("" if t.index is None else f".{t.index}")
