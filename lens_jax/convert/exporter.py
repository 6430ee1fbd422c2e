"""A converted directory or a training workdir -> the official PyTorch layout (safetensors + config.json).

Streams: the output files are planned first (names, shapes, dtypes, shards: headers written up
front), then one group of NNX parameters at a time is read from the Orbax checkpoint as numpy,
turned into its official tensors and written at their offsets. The folder is built under a temp
name and renamed at the end; config.json (and the index) are written last.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Callable

import numpy as np
from flax import nnx

from lens_jax.convert import checkpoint_io
from lens_jax.convert.common import AtomicDir, ConvertError, dtype_name, np_dtype, parse_size
from lens_jax.convert.importer import group_entries, scales_key
from lens_jax.convert.kinds import Spec, get_kind, read_json
from lens_jax.convert.safetensors_io import PlannedTensor, SafetensorsCheckpoint, SafetensorsWriter

DEFAULT_MAX_SHARD = "5GB"


def open_source(src, kind: str | None):
    """(meta, checkpoint directory, tree name default) for a converted dir or a training workdir."""
    src = pathlib.Path(src).absolute()
    if checkpoint_io.is_converted(src):
        meta = checkpoint_io.read_meta(src)
        if kind and kind != meta["kind"]:
            raise ConvertError(f"--kind {kind} but {src} holds a converted {meta['kind']}")
        return meta
    run_cfg = read_json(src / "config.json")
    if run_cfg is not None and (src / "checkpoints").is_dir() and "model" in run_cfg:
        if kind not in (None, "lens-dit"):
            raise ConvertError(f"{src} is a training workdir (a lens-dit); for its text encoder use --src {src / 'text_encoder'}")
        from lens_jax.models.dit import DiTConfig

        cfg = DiTConfig.from_dict(run_cfg["model"])
        te = (run_cfg.get("text_encoder") or {}).get("model") or {}
        extras = {}
        if te.get("selected_layers") is not None and len(te["selected_layers"]) == cfg.num_text_layers:
            extras["selected_layer_index"] = [int(i) for i in te["selected_layers"]]
        return {"kind": "lens-dit", "config": cfg.to_dict(), "extras": extras, "param_dtypes": None, "source": None,
                "workdir": True}
    raise ConvertError(f"--src {src} is neither a converted checkpoint ({checkpoint_io.MARKER}) nor a training "
                       f"workdir (config.json + checkpoints/)")


def export_checkpoint(src, dst, *, kind: str | None = None, dtype: str | None = None, mxfp4: bool = False,
                      fmt: str | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD, step: int | None = None,
                      ema: bool = False, overwrite: bool = False, log: Callable[[str], None] | None = print) -> pathlib.Path:
    t0 = time.perf_counter()
    src = pathlib.Path(src).absolute()
    meta = open_source(src, kind)
    k = get_kind(meta["kind"])
    spec: Spec = k.spec_from_meta(meta, fmt)
    if mxfp4 and spec.kind != "gpt-oss":
        raise ConvertError("--mxfp4 applies to --kind gpt-oss only")
    tree = "ema" if ema else "params"
    if ema and not meta.get("workdir"):
        raise ConvertError("--ema needs a training workdir as --src")
    max_bytes = parse_size(max_shard_size)
    forced = dtype_name(dtype) if dtype else None

    graphdef, abstract = k.abstract(spec)
    flat_abstract = dict(nnx.to_flat_state(abstract))

    source = meta.get("source") or {}
    same_format = source.get("format") == spec.fmt
    src_dtypes = source.get("dtypes") or {}
    param_dtypes = meta.get("param_dtypes") or {}

    def out_dtype(key: str, entry) -> str:
        if forced:
            return forced
        recorded = src_dtypes.get(key) if same_format else None
        if recorded and recorded != "mxfp4":
            return recorded
        if recorded == "mxfp4":
            return "bfloat16"
        names = {param_dtypes.get(".".join(map(str, t.path)), "float32") for t in entry.targets}
        return names.pop() if len(names) == 1 else "float32"

    plan: list[PlannedTensor] = []
    how: dict[str, tuple] = {}  # logical key -> ('plain', dtype) | ('mxfp4', pair)
    for e in spec.entries:
        for key, shape in zip(e.keys, e.shapes):
            pair = spec.pairs.get(key) if mxfp4 else None
            if pair is not None:
                bshape, sshape = pair.stored_shapes(shape)
                plan += [PlannedTensor(pair.blocks, np.dtype(np.uint8), bshape),
                         PlannedTensor(pair.scales, np.dtype(np.uint8), sshape)]
                how[key] = ("mxfp4", pair)
            else:
                d = out_dtype(key, e)
                plan.append(PlannedTensor(key, np_dtype(d), tuple(shape)))
                how[key] = ("plain", d)

    for key, value in spec.constants.items():
        plan.append(PlannedTensor(key, np.asarray(value).dtype, tuple(np.shape(value))))

    hints = None
    sidecar = src / checkpoint_io.SCALES_SIDECAR
    if mxfp4 and sidecar.exists():
        hints = SafetensorsCheckpoint(sidecar)

    ckpt_step = step if step is not None else checkpoint_io.latest_step(src)
    dst = pathlib.Path(dst).absolute()
    with AtomicDir(dst, overwrite) as tmp:
        writer = SafetensorsWriter(tmp, k.file_base(spec.fmt), plan, max_bytes)
        try:
            for paths, entries in group_entries(spec.entries):
                values = checkpoint_io.restore_numpy(src, {p: flat_abstract[p] for p in paths}, step=ckpt_step, tree=tree)
                for e in entries:
                    slots = [values[t.path] if t.index is None else values[t.path][t.index] for t in e.targets]
                    outs = e.from_nnx(slots)
                    for key, shape, a in zip(e.keys, e.shapes, outs):
                        if tuple(a.shape) != tuple(shape):
                            raise ConvertError(f"export: {key} came out {a.shape}, expected {shape}")
                        mode, arg = how[key]
                        if mode == "plain":
                            writer.write(key, np.asarray(a).astype(np_dtype(arg)))
                        else:
                            hint = None
                            if hints is not None and len(e.targets) == 1 and scales_key(e.targets[0]) in hints:
                                hint = hints.read(scales_key(e.targets[0]))
                            blocks, scales = arg.encode(a, hint)
                            writer.write(arg.blocks, blocks)
                            writer.write(arg.scales, scales)
                    del slots, outs
                del values
            for key, value in spec.constants.items():
                writer.write(key, np.asarray(value))
            names = writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            if hints is not None:
                hints.close()
        default_dtype = forced or _dominant(how)
        config = k.export_config(spec, meta, default_dtype, mxfp4)
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if log:
        log(f"exported {spec.kind} ({spec.fmt}{', MXFP4 experts' if mxfp4 else ''}) from {src} "
            f"(step {ckpt_step}{', EMA' if ema else ''}) -> {dst}: {len(plan)} tensors in {len(names)} file(s), "
            f"{time.perf_counter() - t0:.1f}s")
    return dst


def _dominant(how: dict) -> str:
    counts: dict[str, int] = {}
    for mode, arg in how.values():
        if mode == "plain":
            counts[arg] = counts.get(arg, 0) + 1
    return max(counts, key=counts.get) if counts else "bfloat16"
