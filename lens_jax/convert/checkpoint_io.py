"""The converted-checkpoint directory: written once, read into any mesh.

Layout (the same Orbax layout as a training workdir, so `--config.init_from=DIR` and
`text_encoder.weights=DIR` read it with `lens_jax.train.checkpoint.restore_params_only`):

    DIR/
      lens_jax.json                 written last: {"format_version", "kind", "config" (the lens_jax model
                                    config), "extras", "param_dtypes", "source" (format, config.json,
                                    per-key dtypes, mxfp4)} -- its presence marks a complete directory
      checkpoints/0/                an Orbax CheckpointManager step with items
        state/                        {'params': the NNX Param state}, stored in `param_dtypes`
        config/                       JSON {kind, config}
      mxfp4_scales.safetensors      (GPT-OSS imported from MXFP4 only) the imported scales, keyed by
                                    NNX target ('layers.gate_up_proj.3'), reused on --mxfp4 export

The directory is built under a sibling temp name and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from lens_jax.convert.common import ConvertError

MARKER = "lens_jax.json"
FORMAT_VERSION = 1
ITEMS = ("state", "config", "data")  # as lens_jax.train.checkpoint
SCALES_SIDECAR = "mxfp4_scales.safetensors"
DATA_FILE_BYTES = 32 * 2**20


def is_converted(directory) -> bool:
    return (pathlib.Path(directory) / MARKER).is_file()


def read_meta(directory) -> dict:
    path = pathlib.Path(directory) / MARKER
    if not path.is_file():
        raise ConvertError(f"{directory} is not a converted checkpoint (no {MARKER}; an unfinished conversion never has one)")
    meta = json.loads(path.read_text())
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ConvertError(f"{path}: format_version {meta['format_version']} is newer than this lens_jax ({FORMAT_VERSION})")
    return meta


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def save_converted(dst, meta: Mapping[str, Any], params: nnx.State, *, overwrite: bool = False,
                   extra_files: Mapping[str, Any] | None = None, device_host_gb: float = 0.25) -> pathlib.Path:
    """Write `params` + `meta` as a converted directory, atomically (collective over processes).

    `extra_files`: name -> callable(tmp_dir) writing a sidecar before the marker.
    """
    dst = pathlib.Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst} already exists; choose another --dst or pass --overwrite")
    tmp = dst.parent / f".{dst.name}.partial"
    main = jax.process_index() == 0
    if main:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _sync("lens_jax.convert.save:start")
    try:
        manager = ocp.CheckpointManager(
            tmp / "checkpoints",
            options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(save_device_host_concurrent_gb=device_host_gb),
                "config": ocp.JsonCheckpointHandler(),
            },
        )
        manager.save(0, args=ocp.args.Composite(
            # OCDBT buffers each data file in memory until it is written: small files keep the save's
            # memory near one file instead of near the checkpoint's size
            state=ocp.args.PyTreeSave({"params": params}, ocdbt_target_data_file_size=DATA_FILE_BYTES),
            config=ocp.args.JsonSave({"kind": meta["kind"], "config": meta["config"]}),
        ))
        manager.wait_until_finished()
        manager.close()
        if main:
            for name, write in (extra_files or {}).items():
                write(tmp / name)
            (tmp / MARKER).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2) + "\n")
            old = None
            if dst.exists():
                old = dst.parent / f".{dst.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(dst, old)
            os.rename(tmp, dst)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync("lens_jax.convert.save:end")
    return dst


def checkpoint_dir(directory) -> pathlib.Path:
    directory = pathlib.Path(directory).absolute()
    return directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory


def latest_step(directory) -> int:
    manager = ocp.CheckpointManager(checkpoint_dir(directory), item_names=ITEMS)
    step = manager.latest_step()
    manager.close()
    if step is None:
        raise ConvertError(f"no finished checkpoint under {checkpoint_dir(directory)}")
    return step


def restore_numpy(directory, paths_abstract: Mapping[tuple, Any], *, step: int | None = None,
                  tree: str = "params") -> dict[tuple, np.ndarray]:
    """Some params of a checkpoint (converted dir or training workdir) as host numpy arrays.

    `paths_abstract`: NNX path -> abstract Param (ShapeDtypeStruct inside); only these are read, in
    their stored dtype. `tree`: 'params', or 'ema' for a training run's EMA weights.
    """
    manager = ocp.CheckpointManager(checkpoint_dir(directory), item_names=ITEMS)
    step = manager.latest_step() if step is None else step
    if step is None:
        manager.close()
        raise ConvertError(f"no finished checkpoint under {checkpoint_dir(directory)}")
    sub = nnx.State.from_flat_path(dict(paths_abstract))
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), sub)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore({tree: sub}, restore_args={tree: restore_args}, partial_restore=True)))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ConvertError(f"cannot read {tree} {[('.'.join(map(str, p))) for p in list(paths_abstract)[:3]]} from "
                           f"{checkpoint_dir(directory)}/{step}: {e}") from None
    finally:
        manager.close()
    flat = dict(nnx.to_flat_state(restored["state"][tree]))
    out = {}
    for p, v in flat.items():
        arr = v.get_value() if hasattr(v, "get_value") else v
        out[p] = np.asarray(arr)
    return out


def load_converted(directory, mesh=None, **config_overrides):
    """(spec, graphdef, params) of a converted directory, each array restored straight into its
    sharding on `mesh` (from the logical axes through the rules; default: every device on 'fsdp').

    `config_overrides` replace fields of the stored lens_jax config (e.g. dtype='float32').
    """
    from lens_jax.convert.kinds import get_kind
    from lens_jax.parallel.mesh import make_mesh
    from lens_jax.parallel.placement import state_shardings
    from lens_jax.train.checkpoint import restore_params_only

    meta = read_meta(directory)
    kind = get_kind(meta["kind"])
    spec, (graphdef, abstract) = kind.build_abstract_from_meta(meta, **config_overrides)
    if mesh is not None:
        shardings = state_shardings(abstract, mesh)
    else:
        try:
            shardings = state_shardings(abstract, make_mesh({"data": 1, "fsdp": -1, "tensor": 1}))
        except ValueError:  # sizes that do not split over every device: a small model fits on one
            shardings = state_shardings(abstract, make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params = restore_params_only(directory, target)
    return spec, graphdef, params
