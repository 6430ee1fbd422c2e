"""Test driver: train the micro config on this process's devices, then dump the final params.

    python tests/parallel/run_train.py --devices N --workdir DIR --data-dir D [--set FIELD=VALUE ...]

Writes DIR/final_params.npz (process 0) and DIR/shardings.json (the PartitionSpec of every param).
Honours LENS_COORDINATOR / LENS_NUM_PROCESSES / LENS_PROCESS_ID for multi-process runs.
"""

import argparse
import json
import os
import pathlib
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--workdir", required=True)
parser.add_argument("--data-dir", required=True)
parser.add_argument("--set", action="append", default=[])
args = parser.parse_args()
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}").strip()
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from lens_jax.parallel.distributed import maybe_initialize_distributed  # noqa: E402

maybe_initialize_distributed()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from conftest import micro_config  # noqa: E402
from lens_jax.models.dit import DiTConfig  # noqa: E402
from lens_jax.parallel.mesh import make_mesh  # noqa: E402
from lens_jax.train.checkpoint import Checkpointer  # noqa: E402
from lens_jax.train.loop import train  # noqa: E402
from lens_jax.train.optimizer import make_optimizer  # noqa: E402
from lens_jax.train.state import abstract_dit, abstract_train_state, train_state_shardings  # noqa: E402


def parse(v):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


overrides = dict(kv.split("=", 1) for kv in args.set)
cfg = micro_config(args.data_dir, **{k: parse(v) for k, v in overrides.items()})
train(cfg, args.workdir, progress=False)

mesh = make_mesh(dict(cfg.mesh))
with jax.set_mesh(mesh):
    tx = make_optimizer(cfg.optimizer, int(cfg.total_steps))
    _, abstract = abstract_dit(DiTConfig.from_dict(cfg.model))
    sh = train_state_shardings(abstract, tx, mesh, False)
    ckpt = Checkpointer(pathlib.Path(args.workdir) / "checkpoints")
    state = ckpt.restore(ckpt.latest_step(), abstract_train_state(abstract, tx, sh, False))
    ckpt.close()
    flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    specs = {k: {"spec": [list(e) if isinstance(e, tuple) else e for e in v.sharding.spec],
                 "shard_shape": list(v.sharding.shard_shape(v.shape)), "shape": list(v.shape)}
             for k, v in flat.items()}
    gathered = {k: np.asarray(jax.experimental.multihost_utils.process_allgather(v, tiled=True)) for k, v in flat.items()}
if jax.process_index() == 0:
    np.savez(pathlib.Path(args.workdir) / "final_params.npz", **gathered)
    (pathlib.Path(args.workdir) / "shardings.json").write_text(json.dumps(specs, indent=1))
print("done", jax.process_index(), flush=True)
