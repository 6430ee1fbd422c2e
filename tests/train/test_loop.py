"""The training loop end to end on the micro config: outputs, exact kill-and-resume, bad input."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, micro_config
from lens_jax.train.loop import train
from lens_jax.train.metrics import read_metrics


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shapes_data_dir):
    workdir = tmp_path_factory.mktemp("full")
    train(micro_config(shapes_data_dir), workdir, progress=False)
    return workdir


def test_outputs_of_a_run(uninterrupted):
    metrics = read_metrics(uninterrupted)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for m in metrics:
        assert np.isfinite(m["loss"]) and m["loss"] > 0
        for key in ("grad_norm", "lr", "images_per_s", "tokens_per_s", "skipped", "skipped_total"):
            assert key in m, key
        assert "mfu" in m  # null on CPU: no published peak to divide by
    assert list((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
    assert (uninterrupted / "samples" / "latest.png").stat().st_size > 1000
    assert (uninterrupted / "config.json").exists()
    steps = sorted(int(p.name) for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    assert not list((uninterrupted / "checkpoints").glob("*tmp*"))


def test_kill_and_resume_continues_exactly(uninterrupted, tmp_path, shapes_data_dir):
    cfg = micro_config(shapes_data_dir)
    train(cfg, tmp_path, max_steps_this_run=4, progress=False)  # "killed" after step 4; last checkpoint: 3
    # Lines written after the last checkpoint belong to the lost work and are replayed on resume.
    train(micro_config(shapes_data_dir), tmp_path, progress=False)
    full = {m["step"]: m["loss"] for m in read_metrics(uninterrupted)}
    resumed = {m["step"]: m["loss"] for m in read_metrics(tmp_path)}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == full[step], (step, resumed[step], full[step])


def test_sigkill_mid_run_then_resume(uninterrupted, tmp_path, shapes_data_dir):
    """A real SIGKILL of the CLI after its step-3 checkpoint; the restart reproduces steps 4..6."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests"))
    script = (
        "import sys, os, signal; sys.path.insert(0, %r)\n"
        "from conftest import micro_config\n"
        "import lens_jax.train.loop as loop\n"
        "orig = loop.Checkpointer.save\n"
        "def save(self, step, *a, **k):\n"
        "    r = orig(self, step, *a, **k); self.wait()\n"
        "    if step == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return r\n"
        "loop.Checkpointer.save = save\n"
        "loop.train(micro_config(%r), %r, progress=False)\n"
    ) % (str(REPO / "tests"), str(shapes_data_dir), str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]
    train(micro_config(shapes_data_dir), tmp_path, progress=False)
    full = {m["step"]: m["loss"] for m in read_metrics(uninterrupted)}
    for m in read_metrics(tmp_path):
        assert m["loss"] == full[m["step"]], m["step"]


def test_unknown_config_field_fails_naming_it(shapes_data_dir, tmp_path):
    from lens_jax.config import validate

    cfg = micro_config(shapes_data_dir)
    cfg.unlock() if hasattr(cfg, "unlock") else None
    cfg.optimizer.learning_rat = 0.1
    with pytest.raises(ValueError, match=r"config\.optimizer\.learning_rat"):
        validate(cfg)
    cfg = micro_config(shapes_data_dir)
    cfg.model.num_layer = 3
    with pytest.raises(ValueError, match="num_layer"):
        validate(cfg)


def test_cli_rejects_unknown_override_and_bad_mesh(tmp_path):
    base = [sys.executable, "-m", "lens_jax.train", "--config", str(REPO / "configs" / "tiny.py"),
            "--workdir", str(tmp_path / "w")]
    bad_field = subprocess.run(base + ["--config.optimizer.lrr=1"], capture_output=True, text=True, timeout=300)
    assert bad_field.returncode != 0 and "lrr" in bad_field.stderr
    bad_mesh = subprocess.run(base + ["--config.mesh.data=3"], capture_output=True, text=True, timeout=300)
    assert bad_mesh.returncode != 0 and "config.mesh" in bad_mesh.stderr


def test_mesh_that_does_not_divide_devices_fails_at_once():
    from lens_jax.parallel.mesh import mesh_shape

    with pytest.raises(ValueError, match="config.mesh"):
        mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="mesh.fsdp=-1"):
        mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="unknown mesh axis"):
        mesh_shape({"pipeline": 2}, 8)
    assert mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)


def test_info_cli_counts_without_allocating():
    out = subprocess.run([sys.executable, "-m", "lens_jax.info", "--config", str(REPO / "configs" / "lens_3p8b.py")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout)
    assert info["dit_params"] == 4_104_225_152
    assert info["text_encoder_params"] == 20_335_623_744
    b = info["buckets"]["512x512"]
    assert b["image_tokens"] == 1024 and b["text_tokens"] == 512 - 97
    assert b["train_flops_per_sample"] == pytest.approx(3 * b["forward_flops_per_sample"])


def test_corrupt_records_are_skipped_and_counted_by_a_run(tmp_path, shapes_data_dir):
    """A user dataset with a corrupt PNG, a truncated PNG and a missing caption trains on, counting them."""
    from lens_jax.data import shapes, tfds_shapes

    recs = shapes.make_records(seed=3, stream=0, start=0, stop=16, sizes=[(32, 32)])
    recs[2]["image"] = b"\x89PNG\r\n\x1a\nnot an image"
    recs[7]["image"] = recs[7]["image"][:40]
    recs[11]["short_caption"] = ""
    recs[11]["dense_caption"] = ""
    builder_dir = tfds_shapes.write_tfds_dataset(tmp_path / "user_data", {"train": recs, "eval": recs[:4]})
    cfg = micro_config(shapes_data_dir, **{"data.source": "tfds", "data.dir": builder_dir, "total_steps": 4,
                                           "checkpoint_every": 4})
    train(cfg, tmp_path / "run", progress=False)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    # 4 steps x 8 = two epochs of 16 records: each bad record is met twice.
    assert metrics[-1]["skipped_total"] == 6
    assert sum(m["skipped"] for m in metrics) == 6


def test_bench_train_runs_and_reports():
    out = subprocess.run(
        [sys.executable, "-m", "lens_jax.bench", "train", "--config", str(REPO / "configs" / "tiny.py"), "--batch", "4",
         "--layers", "1", "--steps", "1", "--warmup", "0", "--set", "hardware.peak_flops=1e12"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["layers"] == 1 and r["batch"] == 4 and r["image_tokens"] == 64
    assert r["step_time_s"] > 0 and np.isfinite(r["loss"])
    assert r["mfu"] == pytest.approx(r["model_tflops_per_step"] * 1e12 / r["step_time_s"] / 1e12)


def test_training_on_flux2_vae_latents(tmp_path, shapes_data_dir):
    """A tiny FLUX.2-architecture VAE as the codec: seeded random weights saved as a converted
    flux2-vae dir; a second run reading them through codec.weights trains identically."""
    from lens_jax.convert.checkpoint_io import read_meta

    vae = {"codec.kind": "flux2", "codec.seed": 5, "model.in_channels": 16, "model.out_channels": 16,
           "total_steps": 2, "checkpoint_every": 2,
           "codec.vae": dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)}
    train(micro_config(shapes_data_dir, **vae), tmp_path / "a", progress=False)
    assert read_meta(tmp_path / "a" / "vae")["kind"] == "flux2-vae"
    train(micro_config(shapes_data_dir, **{**vae, "codec.weights": str(tmp_path / "a" / "vae"), "codec.seed": 99}),
          tmp_path / "b", progress=False)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert (tmp_path / "a" / "samples" / "latest.png").exists()
