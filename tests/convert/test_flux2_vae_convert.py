"""flux2-vae: diffusers and BFL `ae.safetensors` layouts, round trips, verify against diffusers, the codec."""

from __future__ import annotations

import json

import numpy as np
import pytest

from convert_fixtures import assert_same_tensors
from lens_jax.convert import export_checkpoint, import_checkpoint, load_converted
from lens_jax.convert.__main__ import main as cli
from lens_jax.convert.safetensors_io import SafetensorsCheckpoint

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)


def read_all(path):
    with SafetensorsCheckpoint(path, prefer=("diffusion_pytorch_model", "ae")) as r:
        return {k: r.read(k) for k in r.keys()}


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    n = len(TINY["block_out_channels"])
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * n,
                                       up_block_types=("UpDecoderBlock2D",) * n, **TINY).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
        vae.bn.running_mean.copy_(0.5 * torch.randn(16, generator=gen))
        vae.bn.running_var.copy_(0.5 + torch.rand(16, generator=gen))
        vae.bn.num_batches_tracked.fill_(7)
    root = tmp_path_factory.mktemp("vae") / "pipe"
    vae.save_pretrained(root / "vae")
    (root / "model_index.json").write_text("{}")
    return root


def test_diffusers_roundtrip_and_codec(diffusers_dir, tmp_path):
    conv = import_checkpoint("flux2-vae", diffusers_dir, tmp_path / "conv", log=None)  # the pipeline folder
    meta = json.loads((conv / "lens_jax.json").read_text())
    assert meta["extras"]["dropped"] == {"bn.num_batches_tracked": 7}
    out = export_checkpoint(conv, tmp_path / "out", log=None)
    want = read_all(diffusers_dir / "vae")
    assert_same_tensors(read_all(out), want)  # num_batches_tracked (int64) written back too
    config = json.loads((out / "config.json").read_text())
    original = json.loads((diffusers_dir / "vae" / "config.json").read_text())
    assert config == original
    # a converted VAE directory feeds the FLUX.2 codec
    import ml_collections

    from lens_jax.models.codec import make_codec

    spec, _, state = load_converted(conv)
    codec = make_codec(ml_collections.ConfigDict({"kind": "flux2", "vae": spec.config.to_dict()}), vae_state=state)
    assert codec.channels == 16 and codec.downsample == 8


def test_bfl_layout_roundtrip(diffusers_dir, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    conv = import_checkpoint("flux2-vae", diffusers_dir / "vae", tmp_path / "conv", log=None)
    bfl = export_checkpoint(conv, tmp_path / "bfl", fmt="bfl", log=None)
    assert sorted(p.name for p in bfl.iterdir()) == ["ae.safetensors"]
    sd = read_all(bfl)
    assert sd["encoder.mid.attn_1.q.weight"].ndim == 4 and "decoder.up.2.upsample.conv.weight" in sd
    # diffusers' own LDM converter maps our BFL names back onto the diffusers state dict
    ldm = {k.replace("encoder.quant_conv", "quant_conv").replace("decoder.post_quant_conv", "post_quant_conv"):
           torch.from_numpy(v) for k, v in sd.items()}
    config = json.loads((diffusers_dir / "vae" / "config.json").read_text())
    back = convert_ldm_vae_checkpoint(ldm, config)
    want = read_all(diffusers_dir / "vae")
    for k, v in back.items():
        np.testing.assert_array_equal(v.numpy(), want[k], err_msg=k)
    # BFL in, BFL and diffusers out
    conv2 = import_checkpoint("flux2-vae", bfl / "ae.safetensors", tmp_path / "conv2", log=None,
                              config=diffusers_dir / "vae" / "config.json")  # ae.safetensors has no config
    assert json.loads((conv2 / "lens_jax.json").read_text())["source"]["format"] == "bfl"
    assert_same_tensors(read_all(export_checkpoint(conv2, tmp_path / "bfl2", log=None)), sd)
    assert_same_tensors(read_all(export_checkpoint(conv2, tmp_path / "diff2", fmt="diffusers", log=None)), want)


def test_verify_vae(diffusers_dir, capsys):
    assert cli(["verify", "--kind", "flux2-vae", "--src", str(diffusers_dir)]) == 0
    out = capsys.readouterr().out
    assert "encode (posterior mode)" in out and "decode" in out and "weights" in out
    assert out.strip().splitlines()[-1].startswith("verify flux2-vae: max_abs=") and out.strip().endswith("OK")
