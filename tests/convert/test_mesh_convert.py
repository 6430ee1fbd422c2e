"""Import onto a 4-device mesh and load a converted directory straight into sharded arrays
(a subprocess with 4 CPU devices): every device holds only its shard, values are the checkpoint's."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from convert_fixtures import DIT_CONFIG, dit_reference, state_dict_numpy, write_dit

pytest.importorskip("torch")
REPO = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys
import jax, numpy as np
from flax import nnx
from lens_jax.convert import import_checkpoint, load_converted
from lens_jax.convert.checkpoint_io import restore_numpy
from lens_jax.convert.safetensors_io import load_file
from lens_jax.parallel.mesh import make_mesh

src, dst = sys.argv[1], sys.argv[2]
assert jax.device_count() == 4
mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
import_checkpoint("lens-dit", src, dst, mesh=mesh, log=None)  # placed shard by shard while importing

sd = load_file(src + "/diffusion_pytorch_model.safetensors")
for sizes in ({"data": 1, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 4, "tensor": 1}):
    m = make_mesh(sizes)
    spec, graphdef, params = load_converted(dst, mesh=m)
    flat = {".".join(p): v.get_value() for p, v in nnx.to_flat_state(params)}
    qkv = flat["blocks.img_qkv.kernel"]  # [layers, embed, qkv, heads, head_dim]
    want = np.stack([sd[f"transformer_blocks.{i}.attn.img_qkv.weight"].T.reshape(32, 3, 2, 16) for i in range(2)])
    np.testing.assert_array_equal(np.asarray(qkv), want)
    shard = qkv.addressable_shards[0].data.shape
    if sizes["tensor"] == 2:
        assert tuple(qkv.sharding.spec)[:4] == (None, "fsdp", None, "tensor"), qkv.sharding.spec
        assert shard == (2, 16, 3, 1, 16), shard
    else:
        assert shard == (2, 8, 3, 2, 16), shard
    assert len({s.device for s in qkv.addressable_shards}) == 4
    np.testing.assert_array_equal(np.asarray(flat["txt_norm"])[1], sd["txt_norm.1.weight"])
    np.testing.assert_array_equal(np.asarray(flat["proj_out.kernel"]), sd["proj_out.weight"].T)
print("MESH_OK")
"""


def test_import_and_load_on_a_four_device_mesh(tmp_path):
    config = dict(DIT_CONFIG, mlp_hidden_dim=64)  # 85 (the default for inner 32) would not split over tensor=2
    src = write_dit(tmp_path / "transformer", state_dict_numpy(dit_reference(seed=5, config=config)), config)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip())
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(src), str(tmp_path / "conv")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "MESH_OK" in proc.stdout, proc.stderr[-4000:]
