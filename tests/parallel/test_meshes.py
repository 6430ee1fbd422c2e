"""The same run on 1 device, on 8 simulated devices in three mesh shapes, and on two processes:
same losses, same parameters, and parameters really sharded as the rules table says."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from lens_jax.train.metrics import read_metrics

HERE = pathlib.Path(__file__).resolve().parent
STEPS = 3
# Adam's update lr * m / (sqrt(v) + eps) is ill-conditioned for gradients near eps: with the default
# eps 1e-8, a float32 reduction-order difference in a ~1e-8 gradient (different shardings sum in a
# different order) flips a whole lr-sized step. A larger eps keeps the update smooth in the
# gradient, so parameters can be compared at the same tight tolerance as the losses.
COMMON = [f"total_steps={STEPS}", f"checkpoint_every={STEPS}", "optimizer.eps=1e-4"]


def _run(workdir, data_dir, devices=1, sets=(), env_extra=None, timeout=600):
    cmd = [sys.executable, str(HERE / "run_train.py"), "--devices", str(devices), "--workdir", str(workdir),
           "--data-dir", str(data_dir)]
    for s in COMMON + list(sets):
        cmd += ["--set", s]
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _losses(workdir):
    return [m["loss"] for m in read_metrics(workdir)]


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory, shapes_data_dir):
    workdir = tmp_path_factory.mktemp("single")
    _finish(_run(workdir, shapes_data_dir, devices=1, sets=["mesh.data=1"]))
    return workdir


MESHES = {
    "data8": ["mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"],
    "fsdp8": ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"],
    "data2_fsdp2_tensor2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_shapes_train_identically(name, single_device_run, tmp_path, shapes_data_dir):
    _finish(_run(tmp_path, shapes_data_dir, devices=8, sets=MESHES[name]))
    ref, got = _losses(single_device_run), _losses(tmp_path)
    assert len(got) == STEPS
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    a = np.load(single_device_run / "final_params.npz")
    b = np.load(tmp_path / "final_params.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)

    specs = json.loads((tmp_path / "shardings.json").read_text())
    # The rules table's mapping, the same on every mesh ...
    qkv = specs["['blocks']['img_qkv']['kernel'].value"]  # [layers, embed, qkv, heads, head_dim]
    mlp = specs["['blocks']['img_mlp']['w1']['kernel'].value"]  # [layers, embed, mlp]
    out = specs["['blocks']['img_out']['kernel'].value"]  # [layers, heads, head_dim, embed]
    assert qkv["spec"] == [None, "fsdp", None, "tensor", None]
    assert mlp["spec"] == [None, "fsdp", "tensor"]
    assert out["spec"] == [None, "tensor", None, "fsdp"]
    # ... and what it means on this mesh: how many pieces each dimension is cut into.
    fsdp, tensor = {"data8": (1, 1), "fsdp8": (8, 1), "data2_fsdp2_tensor2": (2, 2)}[name]

    def pieces(entry):
        return [full // shard for full, shard in zip(entry["shape"], entry["shard_shape"])]

    assert pieces(qkv) == [1, fsdp, 1, tensor, 1]
    assert pieces(mlp) == [1, fsdp, tensor]
    assert pieces(out) == [1, tensor, 1, fsdp]
    for key, entry in specs.items():  # RMSNorm weights stay whole
        if key.endswith("['weight'].value") or key.startswith("['txt_norm']"):
            assert pieces(entry) == [1] * len(entry["shape"]), key


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(single_device_run, tmp_path, shapes_data_dir):
    """Two CPU processes through jax.distributed on 127.0.0.1, one device each, same global batch."""
    port = _free_port()
    procs = [
        _run(tmp_path, shapes_data_dir, devices=1, sets=["mesh.data=-1"], env_extra={
            "LENS_COORDINATOR": f"127.0.0.1:{port}", "LENS_NUM_PROCESSES": "2", "LENS_PROCESS_ID": str(i)})
        for i in range(2)
    ]
    outs = [_finish(p) for p in procs]
    assert all("done" in o for o in outs)
    np.testing.assert_allclose(_losses(tmp_path), _losses(single_device_run), rtol=1e-5)
    a = np.load(single_device_run / "final_params.npz")
    b = np.load(tmp_path / "final_params.npz")
    for k in a.files:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_checkpoint_from_fsdp8_resumes_on_one_device(single_device_run, tmp_path, shapes_data_dir):
    """A checkpoint written by 8 FSDP devices restores onto a 1-device mesh and trains on exactly."""
    import shutil

    sharded = tmp_path / "fsdp8"
    _finish(_run(sharded, shapes_data_dir, devices=8, sets=MESHES["fsdp8"]))
    single = tmp_path / "single"
    shutil.copytree(single_device_run, single)
    more = [f"total_steps={STEPS + 1}"]
    runs = [_run(single, shapes_data_dir, devices=1, sets=["mesh.data=1"] + more),
            _run(sharded, shapes_data_dir, devices=1, sets=["mesh.data=1", "mesh.fsdp=1"] + more)]
    for p in runs:
        _finish(p)
    a, b = _losses(single), _losses(sharded)
    assert len(a) == len(b) == STEPS + 1
    np.testing.assert_allclose(b, a, rtol=1e-5)
