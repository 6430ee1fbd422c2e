"""A converted pipeline folder (transformer/, text_encoder/, vae/, tokenizer/, lens_jax_pipeline.json),
built from a tiny released-style pipeline folder (official-layout safetensors for all three components,
mutually consistent sizes) by the converter: the pipeline loads it, the CLI generates from it, and its DiT
is the reference DiT with the same weights."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

sys.path.insert(0, str(REPO / "tests" / "convert"))
from convert_fixtures import dit_reference, state_dict_numpy, write_dit  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

# GPT-OSS: 4 layers, hidden 32; the DiT reads layers (1, 3) (the last one's raw residual).
GPT = dict(
    vocab_size=200, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    num_local_experts=2, num_experts_per_tok=1, intermediate_size=32, sliding_window=4, max_position_embeddings=64,
    rms_norm_eps=1e-5, swiglu_limit=7.0,
    rope_parameters=dict(rope_type="yarn", rope_theta=100.0, factor=4.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                         original_max_position_embeddings=16),
)
# FLUX.2 VAE: 3 blocks (4x down), 4 latent channels -> the codec's 16 channels per 8x8 pixels.
VAE = dict(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
# Lens DiT: in_channels = 4 * latent_channels (2x2 patches), enc_hidden_dim = the GPT-OSS hidden size,
# one text layer per selected GPT-OSS layer; out_channels is nominal (4 * 2 * 2 = 16).
DIT = dict(
    patch_size=2, in_channels=4 * VAE["latent_channels"], out_channels=VAE["latent_channels"], num_layers=2,
    attention_head_dim=16, num_attention_heads=2, enc_hidden_dim=GPT["hidden_size"], axes_dims_rope=[2, 6, 8],
    selected_layer_index=[1, 3],
)
WIDTH, HEIGHT = 24, 16  # 3 x 2 tokens of 8 pixels (VAE 4x, then 2x2 patches): non-square on purpose


def _randomize_gpt(model):
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
                p.copy_(r / np.sqrt(p.shape[1]))
            else:
                p.copy_(r / np.sqrt(p.shape[-1]))


def _randomize_vae(vae):
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
        vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.running_mean.shape, generator=gen))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=gen))


@pytest.fixture(scope="module")
def dit_ref():
    return dit_reference(seed=3, config=DIT)


@pytest.fixture(scope="module")
def released(dit_ref, tmp_path_factory):
    """A released-style pipeline folder: model_index.json, transformer/, text_encoder/, vae/, tokenizer/."""
    from lens_jax.data.tokenizer import build_word_tokenizer

    rel = tmp_path_factory.mktemp("released") / "Lens"
    rel.mkdir()
    (rel / "model_index.json").write_text(json.dumps({"_class_name": "LensPipeline"}))
    write_dit(rel / "transformer", state_dict_numpy(dit_ref), config=DIT)
    torch.manual_seed(0)
    gpt = transformers.GptOssForCausalLM(transformers.GptOssConfig(**GPT, attn_implementation="eager")).eval()
    _randomize_gpt(gpt)
    gpt.save_pretrained(rel / "text_encoder")
    n = len(VAE["block_out_channels"])
    vae = diffusers.AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * n,
                                       up_block_types=("UpDecoderBlock2D",) * n, **VAE).eval()
    _randomize_vae(vae)
    vae.save_pretrained(rel / "vae")
    tok = build_word_tokenizer()
    assert len(tok) <= GPT["vocab_size"]
    tok.save_pretrained(rel / "tokenizer")
    return rel


@pytest.fixture(scope="module")
def folder(released, tmp_path_factory):
    """The converted pipeline folder: the CLI for the DiT (as documented), the Python API for the rest."""
    from lens_jax.convert import import_checkpoint
    from lens_jax.convert.__main__ import main as convert_cli

    out = tmp_path_factory.mktemp("converted") / "lens_converted"
    assert convert_cli(["import", "--kind", "lens-dit", "--src", str(released), "--dst", str(out / "transformer")]) == 0
    import_checkpoint("gpt-oss", released, out / "text_encoder", log=None)  # selected layers from transformer/
    import_checkpoint("flux2-vae", released, out / "vae", log=None)
    shutil.copytree(released / "tokenizer", out / "tokenizer")
    (out / "lens_jax_pipeline.json").write_text(json.dumps(
        {"offset": 0, "max_text_len": 16, "width": WIDTH, "height": HEIGHT}))
    return out


@pytest.fixture(scope="module")
def pipe(folder):
    from lens_jax.sample.pipeline import LensPipeline

    return LensPipeline.from_dir(folder)


def test_from_dir_loads_the_converted_folder(pipe, folder):
    meta = json.loads((folder / "text_encoder" / "lens_jax.json").read_text())
    assert meta["kind"] == "gpt-oss"
    assert pipe.source == str(folder.absolute())
    assert pipe.codec.kind == "flux2" and pipe.codec.channels == DIT["in_channels"] and pipe.codec.downsample == 8
    assert pipe.offset == 0 and pipe.max_text_len == 16 and pipe.default_size == (WIDTH, HEIGHT)
    hidden, mask = pipe.encode_prompts(["a red circle", "a blue square on the left"])
    assert hidden.shape[2:] == (len(DIT["selected_layer_index"]), DIT["enc_hidden_dim"])
    assert np.asarray(mask).sum(axis=1).tolist() == [3, 6]
    assert np.isfinite(np.asarray(hidden, np.float32)).all()


def test_generate_cli_writes_png(pipe, folder, tmp_path):
    from lens_jax.generate import main

    out = tmp_path / "x.png"
    assert main(["--weights", str(folder), "--prompt", "a red circle", "--allow-small", "--width", str(WIDTH),
                 "--height", str(HEIGHT), "--steps", "2", "--out", str(out), "--quiet"]) == 0
    with Image.open(out) as im:
        assert im.size == (WIDTH, HEIGHT) and im.mode == "RGB"
        assert im.text["weights"] == str(folder.absolute()) and im.text["steps"] == "2"
    # the same image as the pipeline object makes (preset lens: guidance 5, empty negative)
    np.testing.assert_array_equal(np.asarray(Image.open(out)),
                                  pipe.generate("a red circle", width=WIDTH, height=HEIGHT, steps=2, allow_small=True)[0])


def test_dit_velocity_is_the_reference_velocity(pipe, dit_ref):
    from flax import nnx

    model = nnx.merge(pipe.dit_graphdef, pipe.dit_params)
    rng = np.random.default_rng(0)
    B, h, w, T = 2, HEIGHT // 8, WIDTH // 8, 5
    x = rng.standard_normal((B, h, w, DIT["in_channels"])).astype(np.float32)
    sigma = np.array([0.3, 0.85], np.float32)
    th = rng.standard_normal((B, T, len(DIT["selected_layer_index"]), DIT["enc_hidden_dim"])).astype(np.float32)
    mask = np.arange(T)[None, :] < np.array([T, 2])[:, None]
    with torch.no_grad():
        want = dit_ref(torch.from_numpy(x), torch.from_numpy(sigma), torch.from_numpy(th), torch.from_numpy(mask)).numpy()
    got = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, x, sigma, th, mask), np.float32)
    assert got.shape == want.shape == (B, h, w, DIT["in_channels"])
    assert float(np.abs(want).max()) > 0.1  # a non-trivial velocity
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_encoder_layers_must_match_the_dit(released, folder, tmp_path):
    """An encoder imported from its component folder alone selects the default layers, not the DiT's."""
    from lens_jax.convert import import_checkpoint
    from lens_jax.sample.pipeline import LensPipeline

    bad = tmp_path / "bad"
    for sub in ("transformer", "vae", "tokenizer"):
        (bad / sub).parent.mkdir(parents=True, exist_ok=True)
        (bad / sub).symlink_to(folder / sub)
    import_checkpoint("gpt-oss", released / "text_encoder", bad / "text_encoder", log=None)  # layers 0..3
    with pytest.raises(ValueError, match=r"returns layers \[0, 1, 2, 3\] but the DiT reads selected_layer_index \[1, 3\]"):
        LensPipeline.from_dir(bad)
    import_checkpoint("gpt-oss", released / "text_encoder", bad / "text_encoder", selected_layers=[1, 3], overwrite=True,
                      log=None)
    assert LensPipeline.from_dir(bad).enc_params is not None
