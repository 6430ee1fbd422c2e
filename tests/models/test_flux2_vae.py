"""FLUX.2 VAE: parity with diffusers' AutoencoderKLFlux2 on a tiny random model (encode, decode, the
pipeline's latent packing), the real shape's parameter / key counts, config handling, weight names."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lens_jax.models.codec import (
    Flux2Codec,
    PixelCodec,
    codec_geometry,
    depth_to_space,
    make_codec,
    space_to_depth,
)
from lens_jax.models.flux2_vae import (
    Flux2VAE,
    Flux2VAEConfig,
    abstract_flux2_vae,
    bfl_key,
    diffusers_key,
    flux2_vae_param_count,
    kernel_from_torch,
    kernel_to_torch,
)
from lens_jax.parallel.rules import logical_to_spec

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Three blocks: two downsamplings (one of them keeps the width, so only block 1 has a conv_shortcut),
# 4 latent channels -> 16 packed channels, 8 pixels per packed token.
TINY = dict(
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
)
# Exercises the optional paths: no quant convs, no mid attention, a narrower decoder.
VARIANT = dict(TINY, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
               decoder_block_out_channels=(4, 8, 8), layers_per_block=2)
H, W = 24, 40  # non-square, a multiple of 8
TOL = 1e-4


def _torch_vae(kw: dict, seed: int):
    n = len(kw["block_out_channels"])
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **kw
    ).eval().float()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.ndim == 1:  # GroupNorm affine and biases: away from the 1 / 0 defaults
                base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
        c = vae.bn.running_mean.shape[0]
        vae.bn.running_mean.copy_(0.5 * torch.randn(c, generator=gen))
        vae.bn.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    return vae


def _nnx_from_torch(vae_t, cfg: Flux2VAEConfig) -> Flux2VAE:
    """The loader a converter writes, from the module docstring's table: every NNX path's diffusers key
    is the path with the leaf renamed (kernel/scale -> weight); conv kernels OIHW -> HWIO, linears
    [out, in] -> [in, out]. Every diffusers key but bn.num_batches_tracked is used exactly once."""
    sd = {k: v.detach().numpy() for k, v in vae_t.state_dict().items()}
    graphdef, abstract = abstract_flux2_vae(cfg)
    leaves, used = [], set()
    for path, var in nnx.to_flat_state(abstract):
        names = [str(p) for p in path]
        if names[0].startswith("bn_running_"):
            key = "bn." + names[0][len("bn_"):]
        else:
            key = ".".join(names[:-1] + [{"kernel": "weight", "scale": "weight", "bias": "bias"}[names[-1]]])
        w = sd[key]
        if names[-1] == "kernel":
            w = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
        assert w.shape == var.shape, (key, w.shape, var.shape)
        leaves.append((path, var.replace(jnp.asarray(w))))
        used.add(key)
    assert set(sd) - used == {"bn.num_batches_tracked"}
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


@pytest.fixture(scope="module")
def tiny():
    vae_t = _torch_vae(TINY, seed=0)
    cfg = Flux2VAEConfig.from_diffusers_config(vae_t.config)
    return vae_t, cfg, _nnx_from_torch(vae_t, cfg)


def _images(seed=0, b=2, h=H, w=W):
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def _nchw(x):
    return torch.from_numpy(np.array(x, np.float32)).permute(0, 3, 1, 2)


def _nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


# The pipeline's packing, as diffusers' Flux2Pipeline writes it (_patchify_latents, _unpatchify_latents,
# and the batch-norm normalisation of _encode_vae_image / the decode branch of __call__).
def _torch_patchify(z):
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def _torch_unpatchify(z):
    b, c, h, w = z.shape
    return z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def _torch_bn(vae_t):
    mean = vae_t.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae_t.bn.running_var.view(1, -1, 1, 1) + vae_t.config.batch_norm_eps)
    return mean, std


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@nnx.jit
def _encode(vae, x):
    return vae.encode(x)


@nnx.jit
def _decode(vae, z):
    return vae.decode(z)


def _parity(vae_t, vae_j, seed):
    x = np.random.default_rng(seed).uniform(-1, 1, (2, H, W, 3)).astype(np.float32)
    with torch.no_grad():
        dist = vae_t.encode(_nchw(x)).latent_dist
        mean_t, logvar_t = _nhwc(dist.mean), _nhwc(dist.logvar)
        z = np.random.default_rng(seed + 1).normal(size=mean_t.shape).astype(np.float32)
        dec_t = _nhwc(vae_t.decode(_nchw(z)).sample)
    mean_j, logvar_j = _encode(vae_j, jnp.asarray(x))
    dec_j = _decode(vae_j, jnp.asarray(z))
    d = vae_j.cfg.vae_downsample
    assert mean_j.shape == logvar_j.shape == (2, H // d, W // d, vae_j.cfg.latent_channels)
    assert dec_j.shape == (2, H, W, 3)
    errs = {"mean": _max_err(mean_j, mean_t), "logvar": _max_err(logvar_j, logvar_t), "decode": _max_err(dec_j, dec_t)}
    print("max abs errors", errs, "output scales", float(np.abs(mean_t).max()), float(np.abs(dec_t).max()))
    for name, e in errs.items():
        assert e < TOL, (name, e)


def test_encode_decode_parity(tiny):
    vae_t, _, vae_j = tiny
    _parity(vae_t, vae_j, seed=3)


def test_variant_parity():
    vae_t = _torch_vae(VARIANT, seed=5)
    cfg = Flux2VAEConfig.from_diffusers_config(vae_t.config)
    assert cfg.decoder_block_out_channels == (4, 8, 8) and not cfg.use_quant_conv and not cfg.mid_block_add_attention
    vae_j = _nnx_from_torch(vae_t, cfg)
    assert vae_j.quant_conv is None and vae_j.post_quant_conv is None and vae_j.encoder.mid_block.attentions is None
    _parity(vae_t, vae_j, seed=7)


def test_codec_matches_torch_pipeline(tiny):
    vae_t, cfg, vae_j = tiny
    codec = Flux2Codec(vae_j)
    assert (codec.kind, codec.downsample, codec.channels) == ("flux2", 8, 16)
    images = _images()
    mean, std = _torch_bn(vae_t)
    with torch.no_grad():
        x = _nchw(images) / 127.5 - 1.0
        lat = vae_t.encode(x).latent_dist.mode()
        packed_t = _nhwc((_torch_patchify(lat) - mean) / std)
    packed_j = codec.encode(jnp.asarray(images))
    assert packed_j.shape == (2, H // 8, W // 8, 16) and packed_j.dtype == jnp.float32
    err_enc = _max_err(packed_j, packed_t)

    latents = np.random.default_rng(9).normal(size=packed_t.shape).astype(np.float32)
    with torch.no_grad():
        z = _torch_unpatchify(_nchw(latents) * std + mean)
        dec_t = _nhwc(vae_t.decode(z).sample)
    dec_j = codec.decode_float(jnp.asarray(latents))
    err_dec = _max_err(dec_j, dec_t)
    print("codec max abs errors: encode", err_enc, "decode", err_dec)
    assert err_enc < TOL and err_dec < TOL
    uint8_t = ((np.clip(dec_t, -1, 1) + 1) * 127.5).astype(np.uint8)
    out = np.asarray(codec.decode(jnp.asarray(latents)))
    assert out.dtype == np.uint8 and out.shape == (2, H, W, 3)
    assert np.mean(out == uint8_t) > 0.99 and np.abs(out.astype(int) - uint8_t).max() <= 1  # truncation boundaries


def test_packing_bit_exact():
    z = np.random.default_rng(0).normal(size=(2, 6, 10, 4)).astype(np.float32)
    packed = np.asarray(space_to_depth(jnp.asarray(z), 2))
    np.testing.assert_array_equal(packed, _nhwc(_torch_patchify(_nchw(z))))
    np.testing.assert_array_equal(np.asarray(depth_to_space(jnp.asarray(packed), 2)), z)
    np.testing.assert_array_equal(_nhwc(_torch_unpatchify(_nchw(packed))), z)
    # channel c*4 + dy*2 + dx of token (i, j) is latent pixel (2i + dy, 2j + dx) of channel c
    assert packed[1, 2, 3, 3 * 4 + 1 * 2 + 0] == z[1, 5, 6, 3]


def test_codec_is_a_pytree_for_jit(tiny):
    _, _, vae_j = tiny
    codec = Flux2Codec(vae_j)
    images = jnp.asarray(_images(1, b=1))
    direct = codec.encode(images)

    @jax.jit
    def as_argument(c, imgs):
        return c.encode(imgs)

    np.testing.assert_array_equal(np.asarray(as_argument(codec, images)), np.asarray(direct))
    # closed over, the weights are compile-time constants: XLA may fold differently (float rounding only)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda imgs: codec.encode(imgs))(images)), np.asarray(direct),
                               rtol=0, atol=1e-6)
    leaves = jax.tree.leaves(codec)
    assert len(leaves) == len(nnx.to_flat_state(nnx.state(vae_j)))
    with pytest.raises(ValueError, match="multiple of the flux2 codec's 8"):
        codec.encode(jnp.zeros((1, 20, 40, 3), jnp.uint8))


def test_bn_stats_are_not_trainable(tiny):
    _, _, vae_j = tiny
    assert isinstance(vae_j.bn_running_mean, nnx.BatchStat) and not isinstance(vae_j.bn_running_mean, nnx.Param)
    _, params, rest = nnx.split(vae_j, nnx.Param, ...)
    rest_paths = {p for p, _ in nnx.to_flat_state(rest)}
    assert rest_paths == {("bn_running_mean",), ("bn_running_var",)}
    assert all(p[0] != "bn_running_mean" for p, _ in nnx.to_flat_state(params))
    for _, v in nnx.to_flat_state(nnx.state(vae_j)):  # every variable carries known logical axes
        logical_to_spec(v.get_metadata()["out_sharding"])


def test_make_codec_and_geometry(tiny):
    _, cfg, vae_j = tiny
    c = ml_collections.ConfigDict({"kind": "flux2", "patch": 8, "vae": {}})
    assert codec_geometry(c) == (16, 128)
    c.vae = cfg.to_dict()
    assert codec_geometry(c) == (8, 16)
    assert codec_geometry(ml_collections.ConfigDict({"kind": "flux2"})) == (16, 128)
    with pytest.raises(ValueError, match="needs the VAE weights"):
        make_codec(c)
    state = nnx.state(vae_j)
    codec = make_codec(c, vae_state=state)
    assert isinstance(codec, Flux2Codec) and (codec.downsample, codec.channels) == (8, 16)
    images = jnp.asarray(_images(2, b=1))
    np.testing.assert_array_equal(np.asarray(codec.encode(images)), np.asarray(Flux2Codec(vae_j).encode(images)))
    assert isinstance(make_codec(c, vae_state=vae_j), Flux2Codec)
    c.vae.latent_channels = 8
    with pytest.raises(ValueError, match="does not match"):
        make_codec(c, vae_state=state)
    assert isinstance(make_codec(ml_collections.ConfigDict({"kind": "pixel", "patch": 4})), PixelCodec)


def test_real_shape_counts():
    """Flux2VAEConfig.flux2() is diffusers' default AutoencoderKLFlux2: same parameters, same keys."""
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLFlux2()
    sd = ref.state_dict()
    assert len(sd) == 251
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= set(sd)
    n_ref = sum(p.numel() for p in ref.parameters())
    cfg = Flux2VAEConfig.flux2()
    assert cfg == Flux2VAEConfig.from_diffusers_config(ref.config)
    assert flux2_vae_param_count(cfg) == n_ref == 84_046_115
    _, abstract = abstract_flux2_vae(cfg)
    flat = nnx.to_flat_state(abstract)
    assert len(flat) == 250  # the 251 keys less num_batches_tracked
    for path, var in flat:
        key = diffusers_key(path)
        want = tuple(sd[key].shape)
        got = tuple(var.shape)
        if path[-1] == "kernel":
            got = tuple(kernel_to_torch(np.zeros(got, np.float32)).shape)
        assert got == want, (key, got, want)
    assert {diffusers_key(p) for p, _ in flat} == set(sd) - {"bn.num_batches_tracked"}
    assert (cfg.downsample, cfg.packed_channels) == (16, 128)
    # the full-size graph traces end to end (shapes only, nothing allocated)
    graphdef, abstract = abstract_flux2_vae(cfg)
    codec = Flux2Codec(graphdef, abstract, cfg=cfg)
    packed = jax.eval_shape(lambda c, x: c.encode(x), codec, jax.ShapeDtypeStruct((1, 32, 48, 3), jnp.uint8))
    assert (packed.shape, packed.dtype) == ((1, 2, 3, 128), jnp.float32)
    images = jax.eval_shape(lambda c, z: c.decode(z), codec, packed)
    assert (images.shape, images.dtype) == ((1, 32, 48, 3), jnp.uint8)


def test_bfloat16_compute(tiny):
    """dtype='bfloat16' computes in bf16 from the same float32 weights (a smoke test of the dtype flow)."""
    _, cfg, vae_j = tiny
    graphdef, state = nnx.split(vae_j)
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    vae_b = nnx.merge(nnx.split(Flux2VAE(bf16, rngs=nnx.Rngs(0)))[0], state)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 8, 16, 3)).astype(np.float32))
    mean_b, logvar_b = _encode(vae_b, x)
    assert mean_b.dtype == logvar_b.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(vae_b)))
    mean_f, _ = _encode(vae_j, x)
    assert _max_err(mean_b, mean_f) < 0.05 * float(jnp.abs(mean_f).max())
    assert _decode(vae_b, mean_b).dtype == jnp.bfloat16


def test_bfl_names_round_trip_through_diffusers_converter(tiny):
    """BFL ae.safetensors names (bfl_key) and the 1x1-conv attention layout, checked with diffusers' own
    LDM-VAE converter (FLUX.2 differs from LDM only by encoder.quant_conv / decoder.post_quant_conv)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae_t, cfg, vae_j = tiny
    n_up = len(cfg.decoder_channels)
    bfl = {}
    for path, var in nnx.to_flat_state(nnx.state(vae_j)):
        names = [str(p) for p in path]
        attn = "attentions" in names and names[-1] == "kernel"
        value = np.asarray(var[...])
        bfl[bfl_key(path, n_up)] = kernel_to_torch(value, bfl_attention=attn) if names[-1] == "kernel" else value
        if names[-1] == "kernel":
            np.testing.assert_array_equal(kernel_from_torch(bfl[bfl_key(path, n_up)], bfl_attention=attn), value)
    assert "encoder.down.1.block.0.nin_shortcut.weight" in bfl and "decoder.up.2.upsample.conv.weight" in bfl
    assert "encoder.mid.attn_1.q.weight" in bfl and bfl["encoder.mid.attn_1.q.weight"].ndim == 4
    ldm = {k.replace("encoder.quant_conv", "quant_conv").replace("decoder.post_quant_conv", "post_quant_conv"):
           torch.from_numpy(np.array(v)) for k, v in bfl.items()}
    converted = convert_ldm_vae_checkpoint(ldm, dict(vae_t.config))
    # the LDM mapping has no bn entries: they keep their names
    converted.update({k: ldm[k] for k in ("bn.running_mean", "bn.running_var")})
    ref = {k: v for k, v in vae_t.state_dict().items() if k != "bn.num_batches_tracked"}
    assert set(converted) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(converted[k].numpy(), ref[k].numpy(), err_msg=k)


def test_config_dicts():
    cfg = Flux2VAEConfig.flux2()
    assert cfg.block_out_channels == (128, 256, 512, 512) and cfg.latent_channels == 32 and cfg.batch_norm_eps == 1e-4
    assert Flux2VAEConfig.from_dict(cfg.to_dict()) == cfg
    tiny = Flux2VAEConfig.from_dict(ml_collections.ConfigDict(dict(TINY, block_out_channels=[8, 16, 16])))
    assert tiny.block_out_channels == (8, 16, 16) and tiny.downsample == 8
    with pytest.raises(ValueError, match="bogus"):
        Flux2VAEConfig.from_dict({"bogus": 1, "latent_channels": 4})
    hub = {"_class_name": "AutoencoderKLFlux2", "_diffusers_version": "0.36.0", "act_fn": "silu",
           "batch_norm_eps": 0.0001, "batch_norm_momentum": 0.1, "block_out_channels": [128, 256, 512, 512],
           "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3,
           "latent_channels": 32, "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32,
           "out_channels": 3, "patch_size": [2, 2], "sample_size": 1024, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "use_post_quant_conv": True, "use_quant_conv": True}
    assert Flux2VAEConfig.from_diffusers_config(hub) == cfg
    assert Flux2VAEConfig.from_diffusers_config(hub, dtype="bfloat16").dtype == "bfloat16"
    for bad in ({"act_fn": "gelu"}, {"patch_size": [1, 1]}, {"down_block_types": ["AttnDownEncoderBlock2D"] * 4}):
        with pytest.raises(ValueError, match="not supported"):
            Flux2VAEConfig.from_diffusers_config({**hub, **bad})
    with pytest.raises(ValueError, match="scaling_factor"):
        Flux2VAEConfig.from_diffusers_config({**hub, "scaling_factor": 0.5})
    with pytest.raises(ValueError, match="norm_num_groups"):
        Flux2VAEConfig(block_out_channels=(8, 12), norm_num_groups=8)
    with pytest.raises(ValueError, match="dtype"):
        dataclasses.replace(cfg, dtype="float64")
