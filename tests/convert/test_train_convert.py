"""Converted checkpoints and training: a trained DiT exported for PyTorch, converted dirs as init_from
and as the text encoder's weights."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import micro_config
from lens_jax.convert import ConvertError, export_checkpoint, import_checkpoint
from lens_jax.convert.checkpoint_io import restore_numpy
from lens_jax.models.dit import DiTConfig
from lens_jax.train.checkpoint import restore_params_only
from lens_jax.train.loop import train
from lens_jax.train.state import abstract_dit

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_data_dir):
    workdir = tmp_path_factory.mktemp("run")
    cfg = micro_config(shapes_data_dir, total_steps=2, checkpoint_every=2)
    train(cfg, workdir, progress=False)
    return workdir, cfg


def _flax_params(workdir, cfg):
    dit_cfg = DiTConfig.from_dict(cfg.model)
    graphdef, abstract = abstract_dit(dit_cfg)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract)
    return graphdef, restore_params_only(workdir, target)


def test_trained_dit_exports_to_pytorch(trained, tmp_path):
    from safetensors.torch import load_file

    from lens_jax.convert.reference.lens_dit_torch import LensDiTTorch

    workdir, cfg = trained
    out = export_checkpoint(workdir, tmp_path / "transformer", log=None)
    config = json.loads((out / "config.json").read_text())
    assert config["in_channels"] == 192 and config["mlp_hidden_dim"] == 64 and config["selected_layer_index"] == [0, 1]
    ref = LensDiTTorch(config).eval()
    ref.load_state_dict(load_file(str(out / "diffusion_pytorch_model.safetensors")), strict=True)
    assert all(v.dtype == torch.float32 for v in ref.state_dict().values())

    graphdef, params = _flax_params(workdir, cfg)
    model = nnx.merge(graphdef, params)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 3, 192)).astype(np.float32)
    sigma = np.array([0.2, 0.7], np.float32)
    th = rng.standard_normal((2, 5, 2, 32)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
    with torch.no_grad():
        want = ref(*(torch.from_numpy(a) for a in (x, sigma, th, mask))).numpy()
    got = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, x, sigma, th, mask))
    err = float(np.max(np.abs(got - want)))
    print(f"\ntrained micro DiT, Flax vs exported PyTorch: max abs {err:.2e} (max |v| {np.max(np.abs(want)):.2f})")
    assert err < 1e-4
    # bf16 export of the same run (the official dtype): same keys, values rounded once
    out16 = export_checkpoint(workdir, tmp_path / "bf16", dtype="bf16", log=None)
    sd16 = load_file(str(out16 / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in sd16.values()) and set(sd16) == set(ref.state_dict())


def _hf_text_encoder(seed=0):
    """A transformers GPT-OSS with the micro config's text-encoder sizes (GPT-OSS-20B numerics otherwise)."""
    torch.manual_seed(seed)
    cfg = transformers.GptOssConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                                    intermediate_size=32, sliding_window=8)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_converted_dirs_as_init_from_and_text_encoder(trained, tmp_path, shapes_data_dir):
    workdir, cfg = trained
    # the run saved its seeded encoder as a converted gpt-oss directory
    assert json.loads((workdir / "text_encoder" / "lens_jax.json").read_text())["kind"] == "gpt-oss"

    # a DiT (the trained one, through the official layout and back) and a transformers text encoder
    dit_conv = import_checkpoint("lens-dit", export_checkpoint(workdir, tmp_path / "dit_pt", dtype="bf16", log=None),
                                 tmp_path / "dit_conv", log=None)
    hf = _hf_text_encoder()
    hf.save_pretrained(tmp_path / "te_pt")
    te_conv = import_checkpoint("gpt-oss", tmp_path / "te_pt", tmp_path / "te_conv", selected_layers=[0, 1], log=None)

    run2 = tmp_path / "run2"
    cfg2 = micro_config(shapes_data_dir, total_steps=1, checkpoint_every=1, init_from=str(dit_conv),
                        **{"optimizer.lr": 0.0, "text_encoder.weights": str(te_conv)})
    train(cfg2, run2, progress=False)
    # lr 0: the step-1 weights are exactly the init_from weights (stored bf16, restored into float32)
    paths = {p: v for p, v in nnx.to_flat_state(abstract_dit(DiTConfig.from_dict(cfg.model))[1])}
    after = restore_numpy(run2, paths)
    conv = restore_numpy(dit_conv, paths)
    trained_f32 = restore_numpy(workdir, paths)
    for p in paths:
        assert after[p].dtype == np.float32 and conv[p].dtype.name == "bfloat16"
        np.testing.assert_array_equal(after[p], conv[p].astype(np.float32))
    assert any(not np.array_equal(after[p], trained_f32[p]) for p in paths)  # really the bf16 copy

    # the encoder the run used holds the transformers weights
    from lens_jax.parallel.mesh import make_mesh
    from lens_jax.text.encoder import load_text_encoder

    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    _, params, _ = load_text_encoder(cfg2.text_encoder, mesh)
    flat = {".".join(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    np.testing.assert_array_equal(flat["embed_tokens"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(flat["layers.q_proj.kernel"][1], sd["model.layers.1.self_attn.q_proj.weight"].T.reshape(32, 2, 16))
    np.testing.assert_array_equal(flat["layers.gate_up_proj"][0], sd["model.layers.0.mlp.experts.gate_up_proj"])
    assert "lm_head.kernel" not in flat  # the converted dir has it; the encoder does not ask for it

    # a text-encoder config that does not match the weights is named, field by field
    bad = micro_config(shapes_data_dir, **{"text_encoder.weights": str(te_conv)})
    bad.text_encoder.model = dict(bad.text_encoder.model, sliding_window=16)
    with pytest.raises(ValueError, match="sliding_window: config 16 vs weights 8"):
        load_text_encoder(bad.text_encoder, mesh)


def test_export_text_encoder_of_a_run(trained, tmp_path):
    workdir, _ = trained
    out = export_checkpoint(workdir / "text_encoder", tmp_path / "te", log=None)
    model, info = transformers.GptOssForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert info["missing_keys"] == {"lm_head.weight"} or set(info["missing_keys"]) == {"lm_head.weight"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    with pytest.raises(ConvertError, match="training workdir"):
        export_checkpoint(workdir, tmp_path / "x", kind="gpt-oss", log=None)
