"""gpt-oss: transformers plain / MXFP4 and OpenAI `original/` checkpoints, round trips and parity."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from convert_fixtures import assert_same_tensors
from lens_jax.convert import ConvertError, export_checkpoint, import_checkpoint, load_converted, mxfp4
from lens_jax.convert.__main__ import main as cli
from lens_jax.convert.safetensors_io import SafetensorsCheckpoint, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# 4 layers (sliding on 0, 2), selected (1, 3): the last layer's raw residual, not the post-norm state.
# YaRN with original context 8 < sequence 12; betas chosen so the ramp blends some dims of head_dim 16.
TINY_HF = dict(
    vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, sliding_window=4, max_position_embeddings=256,
    rms_norm_eps=1e-5, swiglu_limit=1.0,
    rope_parameters=dict(rope_type="yarn", rope_theta=100.0, factor=32.0, beta_fast=0.5, beta_slow=0.1, truncate=False,
                         original_max_position_embeddings=8),
)
SELECTED = [1, 3]
SEQ, LENGTHS = 12, (12, 9, 3)
MX_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def read_all(folder):
    with SafetensorsCheckpoint(folder, prefer=("model",)) as r:
        return {k: r.read(k) for k in r.keys()}


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**TINY_HF, attn_implementation="eager")).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("embed_tokens.weight") or name.endswith("sinks"):
                p.copy_(r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            elif name.endswith("gate_up_proj") or name.endswith("down_proj"):
                p.copy_(r / np.sqrt(p.shape[1]))  # [E, in, out]
            else:
                p.copy_(r / np.sqrt(p.shape[-1]))
    return model


@pytest.fixture(scope="module")
def dirs(hf_model, tmp_path_factory):
    """plain (save_pretrained, fp32), mx (hub-like: bf16 + MXFP4 experts), original (OpenAI naming)."""
    root = tmp_path_factory.mktemp("gpt")
    hf_model.save_pretrained(root / "plain")
    config = json.loads((root / "plain" / "config.json").read_text())
    plain = read_all(root / "plain")
    rng = np.random.default_rng(0)
    mx = {}
    for k, v in plain.items():
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            E, n_in, n_out = v.shape
            blocks = rng.integers(0, 256, (E, n_out, n_in // 32, 16), dtype=np.uint8)
            scales = rng.integers(118, 124, (E, n_out, n_in // 32), dtype=np.uint8)
            blocks[0, 0, 0] = 0  # an all-zero group
            blocks[1, 2, 1, :3] = 0x88  # -0 nibbles
            mx[k + "_blocks"], mx[k + "_scales"] = blocks, scales
        else:
            mx[k] = v.astype(ml_dtypes.bfloat16)
    (root / "mx").mkdir()
    save_file(root / "mx" / "model.safetensors", mx)
    (root / "mx" / "config.json").write_text(json.dumps(
        {**config, "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": MX_NOT_CONVERTED}}))

    H, K, d = 4, 2, 16
    orig = {"embedding.weight": mx["model.embed_tokens.weight"], "norm.scale": mx["model.norm.weight"].astype(np.float32),
            "unembedding.weight": mx["lm_head.weight"]}
    for i in range(TINY_HF["num_hidden_layers"]):
        p, q = f"model.layers.{i}.", f"block.{i}."
        orig[q + "attn.norm.scale"] = mx[p + "input_layernorm.weight"].astype(np.float32)
        orig[q + "mlp.norm.scale"] = mx[p + "post_attention_layernorm.weight"].astype(np.float32)
        for leaf in ("weight", "bias"):
            orig[q + f"attn.qkv.{leaf}"] = np.concatenate([mx[p + f"self_attn.{n}_proj.{leaf}"] for n in "qkv"])
            orig[q + f"attn.out.{leaf}"] = mx[p + f"self_attn.o_proj.{leaf}"]
            orig[q + f"mlp.gate.{leaf}"] = mx[p + f"mlp.router.{leaf}"]
        orig[q + "attn.sinks"] = mx[p + "self_attn.sinks"]
        for a, b in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
            orig[q + f"mlp.{a}_weight.blocks"] = mx[p + f"mlp.experts.{b}_blocks"]
            orig[q + f"mlp.{a}_weight.scales"] = mx[p + f"mlp.experts.{b}_scales"]
            orig[q + f"mlp.{a}_bias"] = mx[p + f"mlp.experts.{b}_bias"]
    (root / "original").mkdir()
    save_file(root / "original" / "model.safetensors", orig)
    rope = TINY_HF["rope_parameters"]
    (root / "original" / "config.json").write_text(json.dumps(dict(
        num_hidden_layers=4, num_experts=4, experts_per_token=2, vocab_size=100, hidden_size=64, intermediate_size=64,
        swiglu_limit=1.0, head_dim=16, num_attention_heads=H, num_key_value_heads=K, sliding_window=4,
        initial_context_length=8, rope_theta=100.0, rope_scaling_factor=32.0, rope_ntk_alpha=rope["beta_slow"],
        rope_ntk_beta=rope["beta_fast"])))
    return {"root": root, "config": config, "plain": plain, "mx": mx, "orig": orig}


def _imp(src, dst):
    return import_checkpoint("gpt-oss", src, dst, selected_layers=SELECTED, log=None)


def test_plain_roundtrip_and_transformers_loads_it(dirs, tmp_path):
    conv = _imp(dirs["root"] / "plain", tmp_path / "conv")
    meta = json.loads((conv / "lens_jax.json").read_text())
    assert meta["source"]["format"] == "transformers" and meta["extras"]["include_lm_head"]
    assert meta["config"]["selected_layers"] == SELECTED and meta["config"]["rope_original_max_position_embeddings"] == 8
    out = export_checkpoint(conv, tmp_path / "out", log=None)
    assert_same_tensors(read_all(out), dirs["plain"])
    config = json.loads((out / "config.json").read_text())
    strip = ("dtype", "torch_dtype", "rope_parameters", "rope_scaling", "rope_theta", "transformers_version")
    assert {k: v for k, v in config.items() if k not in strip} == {k: v for k, v in dirs["config"].items() if k not in strip}
    model, info = transformers.GptOssForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.rope_parameters["original_max_position_embeddings"] == 8
    assert model.config.rope_parameters["beta_slow"] == 0.1 and model.config.rope_parameters["rope_theta"] == 100.0


def test_parity_selected_layers_after_import(hf_model, dirs, tmp_path):
    conv = _imp(dirs["root"] / "plain", tmp_path / "conv")
    spec, graphdef, params = load_converted(conv, dtype="float32")
    enc = nnx.merge(graphdef, params)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, size=(len(LENGTHS), SEQ)).astype(np.int32)
    mask = np.arange(SEQ)[None, :] < np.array(LENGTHS)[:, None]
    got = np.asarray(nnx.jit(lambda m, i, k: m(i, k))(enc, ids, mask))
    captured = {}
    hooks = [hf_model.model.layers[i].register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o))
             for i in SELECTED]
    with torch.no_grad():
        hf_model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    for h in hooks:
        h.remove()
    for j, layer in enumerate(SELECTED):
        want = (captured[layer][0] if isinstance(captured[layer], tuple) else captured[layer]).numpy()
        err = float(np.max(np.abs(got[:, :, j] - want)[mask]))
        print(f"\ngpt-oss layer {layer} after import: max abs {err:.2e}")
        assert err < 1e-4


def test_mxfp4_roundtrip_bytes_and_exact_dequantisation(dirs, tmp_path):
    conv = _imp(dirs["root"] / "mx", tmp_path / "conv")
    assert (conv / "mxfp4_scales.safetensors").exists()
    meta = json.loads((conv / "lens_jax.json").read_text())
    assert meta["param_dtypes"]["layers.gate_up_proj"] == "bfloat16" and meta["source"]["mxfp4"]
    out = export_checkpoint(conv, tmp_path / "mx_out", mxfp4=True, log=None)
    assert_same_tensors(read_all(out), dirs["mx"])
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    # without --mxfp4: the dequantised experts, exactly transformers' own dequantisation
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    plain = read_all(export_checkpoint(conv, tmp_path / "deq", log=None))
    assert "quantization_config" not in json.loads((tmp_path / "deq" / "config.json").read_text())
    for i in range(4):
        for name in ("gate_up_proj", "down_proj"):
            k = f"model.layers.{i}.mlp.experts.{name}"
            ref = convert_moe_packed_tensors(torch.from_numpy(dirs["mx"][k + "_blocks"]),
                                             torch.from_numpy(dirs["mx"][k + "_scales"]), dtype=torch.float32).numpy()
            assert plain[k].dtype == ml_dtypes.bfloat16
            assert plain[k].astype(np.float32).tobytes() == ref.tobytes(), k
    # a trained (changed) expert is requantised with the canonical scales where the old ones no longer fit
    w = plain["model.layers.0.mlp.experts.down_proj"].astype(np.float32)
    b, s = mxfp4.Pair("k", "b", "s", transpose=True).encode(w * 4)
    assert np.array_equal(mxfp4.dequantize(b, s).transpose(0, 2, 1), w * 4)


def test_original_naming_roundtrip_and_cross_format(dirs, tmp_path):
    conv = _imp(dirs["root"] / "original", tmp_path / "conv")
    meta = json.loads((conv / "lens_jax.json").read_text())
    assert meta["source"]["format"] == "original"
    out = export_checkpoint(conv, tmp_path / "orig_out", mxfp4=True, log=None)
    assert_same_tensors(read_all(out), dirs["orig"])  # float32 norms, bf16 rest, MXFP4 bytes: all as imported
    assert json.loads((out / "config.json").read_text()) == json.loads((dirs["root"] / "original" / "config.json").read_text())
    # the same tensors in transformers naming equal the hub-style MXFP4 checkpoint
    hf = export_checkpoint(conv, tmp_path / "hf_out", fmt="transformers", mxfp4=True, dtype="bf16", log=None)
    assert_same_tensors(read_all(hf), dirs["mx"])


def test_verify_mxfp4_and_original(dirs, capsys):
    for name in ("mx", "original"):
        assert cli(["verify", "--kind", "gpt-oss", "--src", str(dirs["root"] / name)]) == 0
        out = capsys.readouterr().out
        assert "layer 3 output" in out and "logits" in out and "weights" in out
        assert out.strip().splitlines()[-1].endswith(" OK")


def test_bad_mxfp4_shape_is_named(dirs, tmp_path):
    bad = dict(dirs["mx"])
    key = "model.layers.2.mlp.experts.down_proj_scales"
    bad[key] = bad[key][:, :, :1].copy()
    (tmp_path / "bad").mkdir()
    save_file(tmp_path / "bad" / "model.safetensors", bad)
    (tmp_path / "bad" / "config.json").write_text((dirs["root"] / "mx" / "config.json").read_text())
    with pytest.raises(ConvertError) as e:
        _imp(tmp_path / "bad", tmp_path / "never")
    msg = str(e.value)
    assert key in msg and "[4, 64, 1]" in msg and "[4, 64, 2]" in msg, msg
    assert not (tmp_path / "never").exists()


def test_pipeline_folder_takes_the_dit_selected_layers(dirs, tmp_path):
    import shutil

    pipe = tmp_path / "pipe"
    shutil.copytree(dirs["root"] / "mx", pipe / "text_encoder")
    (pipe / "transformer").mkdir()
    (pipe / "transformer" / "config.json").write_text(json.dumps({"selected_layer_index": [0, 2]}))
    (pipe / "model_index.json").write_text("{}")
    conv = import_checkpoint("gpt-oss", pipe, tmp_path / "conv", log=None)
    assert json.loads((conv / "lens_jax.json").read_text())["config"]["selected_layers"] == [0, 2]
