"""lens-dit: import / export round trips, parity with the PyTorch reference, bad input, atomic output, CLI."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from convert_fixtures import (
    DIT_CONFIG,
    assert_same_tensors,
    dit_reference,
    read_all,
    state_dict_numpy,
    write_dit,
)
from lens_jax.convert import ConvertError, export_checkpoint, import_checkpoint, load_converted
from lens_jax.convert.__main__ import main as cli

torch = pytest.importorskip("torch")
REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ref():
    return dit_reference(seed=0)


@pytest.fixture(scope="module")
def fp32_dir(ref, tmp_path_factory):
    return write_dit(tmp_path_factory.mktemp("dit32") / "transformer", state_dict_numpy(ref))


@pytest.fixture(scope="module")
def converted(fp32_dir, tmp_path_factory):
    return import_checkpoint("lens-dit", fp32_dir, tmp_path_factory.mktemp("conv") / "dit", log=None)


def test_key_table_is_the_reference_state_dict_in_order(ref):
    from lens_jax.convert import keys_lens_dit

    cfg = keys_lens_dit.config_from_official(DIT_CONFIG)
    entries = keys_lens_dit.entries(cfg)
    assert [e.keys[0] for e in entries] == list(ref.state_dict())
    assert [e.shapes[0] for e in entries] == [tuple(v.shape) for v in ref.state_dict().values()]


def test_roundtrip_fp32_bit_exact(converted, fp32_dir, tmp_path):
    meta = json.loads((converted / "lens_jax.json").read_text())
    assert meta["kind"] == "lens-dit" and meta["config"]["out_channels"] == 12  # nominal 3 * 2 * 2
    assert (converted / "checkpoints" / "0" / "state").is_dir()
    out = export_checkpoint(converted, tmp_path / "out", log=None)
    assert_same_tensors(read_all(out), read_all(fp32_dir))
    assert json.loads((out / "config.json").read_text()) == DIT_CONFIG
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_sharded_bf16_pipeline_folder_roundtrip(ref, tmp_path):
    """--src = the whole pipeline folder; sharded input with an index json; sharded output with one."""
    pipe = tmp_path / "pipe"
    sd = state_dict_numpy(ref, ml_dtypes.bfloat16)
    write_dit(pipe / "transformer", sd, shards=3)
    (pipe / "model_index.json").write_text("{}")
    (pipe / "vae").mkdir()
    conv = import_checkpoint("lens-dit", pipe, tmp_path / "conv", log=None)
    meta = json.loads((conv / "lens_jax.json").read_text())
    assert set(meta["param_dtypes"].values()) == {"bfloat16"}  # stored as imported, exactly
    out = export_checkpoint(conv, tmp_path / "out", max_shard_size="40KB", log=None)
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd) and len(set(index["weight_map"].values())) > 1
    assert_same_tensors(read_all(out), sd)
    # fp16 / fp32 on request
    out16 = export_checkpoint(conv, tmp_path / "out16", dtype="fp16", log=None)
    got = read_all(out16)
    assert all(v.dtype == np.float16 for v in got.values())
    np.testing.assert_array_equal(got["img_in.weight"], sd["img_in.weight"].astype(np.float16))


def test_fp16_roundtrip_and_forced_dtype(ref, tmp_path):
    sd = state_dict_numpy(ref, np.float16)
    conv = import_checkpoint("lens-dit", write_dit(tmp_path / "fp16", sd), tmp_path / "conv", log=None)
    assert_same_tensors(read_all(export_checkpoint(conv, tmp_path / "out", log=None)), sd)
    conv32 = import_checkpoint("lens-dit", tmp_path / "fp16", tmp_path / "conv32", dtype="fp32", log=None)
    assert set(json.loads((conv32 / "lens_jax.json").read_text())["param_dtypes"].values()) == {"float32"}
    assert_same_tensors(read_all(export_checkpoint(conv32, tmp_path / "out32", dtype="fp16", log=None)), sd)


def test_parity_with_reference_after_import(ref, converted):
    spec, graphdef, params = load_converted(converted)
    model = nnx.merge(graphdef, params)
    rng = np.random.default_rng(1)
    B, h, w, T = 3, 3, 5, 6  # non-square grid
    x = rng.standard_normal((B, h, w, 12)).astype(np.float32)
    sigma = np.array([0.0, 0.37, 0.91], np.float32)
    th = (3 * rng.standard_normal((B, T, 3, 24))).astype(np.float32)
    mask = np.arange(T)[None] < np.array([6, 2, 4])[:, None]  # padded text
    with torch.no_grad():
        want = ref(*(torch.from_numpy(a) for a in (x, sigma, th, mask))).numpy()
    got = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, x, sigma, th, mask))
    err = float(np.max(np.abs(got - want)))
    print(f"\nlens-dit parity after import: max abs {err:.2e} (max |v| {np.max(np.abs(want)):.2f})")
    assert err < 1e-4


# ----------------------------------------------------------------------------------------------
# bad input


def _expect_error(tmp_path, sd, config, *needles):
    src = write_dit(tmp_path / "bad", sd, config)
    dst = tmp_path / "never"
    with pytest.raises(ConvertError) as e:
        import_checkpoint("lens-dit", src, dst, log=None)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
    return str(e.value)


def test_missing_key(ref, tmp_path):
    sd = state_dict_numpy(ref)
    del sd["transformer_blocks.1.attn.norm_added_k.weight"]
    _expect_error(tmp_path, sd, DIT_CONFIG, "missing", "transformer_blocks.1.attn.norm_added_k.weight")


def test_unexpected_key(ref, tmp_path):
    sd = state_dict_numpy(ref)
    sd["transformer_blocks.2.attn.img_qkv.weight"] = sd["transformer_blocks.1.attn.img_qkv.weight"].copy()
    _expect_error(tmp_path, sd, DIT_CONFIG, "unexpected", "transformer_blocks.2.attn.img_qkv.weight")


def test_wrong_shape(ref, tmp_path):
    sd = state_dict_numpy(ref)
    sd["transformer_blocks.0.img_mlp.w2.weight"] = sd["transformer_blocks.0.img_mlp.w2.weight"][:, :80]
    _expect_error(tmp_path, sd, DIT_CONFIG, "transformer_blocks.0.img_mlp.w2.weight", "[32, 80]", "[32, 85]")


def test_config_does_not_match_tensors(ref, tmp_path):
    bad = dict(DIT_CONFIG, num_attention_heads=4, axes_dims_rope=[2, 6, 8])  # inner 64 instead of 32
    msg = _expect_error(tmp_path, state_dict_numpy(ref), bad, "img_in.weight", "[32, 12]", "[64, 12]")
    assert "heads=4x16" in msg


def test_existing_destination_is_refused(converted, fp32_dir):
    with pytest.raises(ConvertError, match="already exists"):
        import_checkpoint("lens-dit", fp32_dir, converted, log=None)


def test_interrupted_outputs_never_look_complete(fp32_dir, converted, tmp_path, monkeypatch):
    from lens_jax.convert import exporter, importer

    calls = {"n": 0}
    put = importer.Builder.put

    def failing_put(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt("simulated kill during import")
        return put(self, *a, **k)

    monkeypatch.setattr(importer.Builder, "put", failing_put)
    with pytest.raises(KeyboardInterrupt):
        import_checkpoint("lens-dit", fp32_dir, tmp_path / "imp", log=None)
    monkeypatch.setattr(importer.Builder, "put", put)
    assert not (tmp_path / "imp").exists() and list(tmp_path.iterdir()) == []

    write = exporter.SafetensorsWriter.write

    def failing_write(self, key, array):
        if key.startswith("transformer_blocks.1"):
            raise KeyboardInterrupt("simulated kill during export")
        return write(self, key, array)

    monkeypatch.setattr(exporter.SafetensorsWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(converted, tmp_path / "exp", log=None)
    assert not (tmp_path / "exp").exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# CLI


def test_verify_cli_ok_then_fail_on_a_corrupted_tensor(ref, fp32_dir, converted, tmp_path, capsys):
    assert cli(["verify", "--kind", "lens-dit", "--src", str(fp32_dir), "--dst", str(converted)]) == 0
    out = capsys.readouterr().out
    assert "velocity: max_abs=" in out and "max_rel=" in out
    line = out.strip().splitlines()[-1]
    assert line.startswith("verify lens-dit: max_abs=") and line.endswith(" OK"), line

    sd = state_dict_numpy(ref)
    sd["transformer_blocks.0.txt_mlp.w3.weight"] = sd["transformer_blocks.0.txt_mlp.w3.weight"] * 1.5
    bad = write_dit(tmp_path / "corrupt", sd)
    assert cli(["verify", "--kind", "lens-dit", "--src", str(bad), "--dst", str(converted)]) == 1
    out = capsys.readouterr().out
    line = out.strip().splitlines()[-1]
    assert line.startswith("verify lens-dit: max_abs=") and line.endswith(" FAIL"), line
    assert "velocity" in out and "over tolerance" in out

    # the last block's text-stream MLP cannot change the velocity; the weight comparison still sees it
    sd = state_dict_numpy(ref)
    sd["transformer_blocks.1.txt_mlp.w3.weight"][0, 0] += 0.01
    dead = write_dit(tmp_path / "dead", sd)
    assert cli(["verify", "--kind", "lens-dit", "--src", str(dead), "--dst", str(converted)]) == 1
    out = capsys.readouterr().out
    assert "weights (67 tensors): max_abs=1.000e-02" in out and out.strip().endswith("FAIL")


def test_cli_without_torch(fp32_dir, tmp_path):
    """The converter never imports torch; verify says how to get it."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from lens_jax.convert.__main__ import main\n"
        "import lens_jax.convert.importer, lens_jax.convert.exporter, lens_jax.text.encoder, lens_jax.train.loop\n"
        f"rc = main(['import', '--kind', 'lens-dit', '--src', {str(fp32_dir)!r}, '--dst', {str(tmp_path / 'c')!r}])\n"
        "assert rc == 0, rc\n"
        f"rc = main(['export', '--src', {str(tmp_path / 'c')!r}, '--dst', {str(tmp_path / 'e')!r}, '--dtype', 'bf16'])\n"
        "assert rc == 0, rc\n"
        f"sys.exit(main(['verify', '--kind', 'lens-dit', '--src', {str(fp32_dir)!r}]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "pip install -e .[test]" in proc.stderr
    assert (tmp_path / "c" / "lens_jax.json").exists() and (tmp_path / "e" / "config.json").exists()
