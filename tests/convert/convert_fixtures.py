"""Builders shared by the converter tests: tiny official-layout checkpoints written to disk."""

from __future__ import annotations

import json
import pathlib

import ml_dtypes
import numpy as np

from lens_jax.convert.safetensors_io import SafetensorsCheckpoint

# Tiny Lens DiT: unequal RoPE axes, 3 text layers (Lens' selected layers are kept as config values).
DIT_CONFIG = dict(
    patch_size=2, in_channels=12, out_channels=3, num_layers=2, attention_head_dim=16, num_attention_heads=2,
    enc_hidden_dim=24, axes_dims_rope=[2, 6, 8], selected_layer_index=[5, 11, 17],
)


def randomize_(module, seed: int) -> None:
    """Non-trivial well-scaled values: norm weights in [0.5, 1.5], non-zero biases, fan-in weights."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[-1]))


def dit_reference(seed=0, config=DIT_CONFIG):
    import torch

    from lens_jax.convert.reference.lens_dit_torch import LensDiTTorch

    ref = LensDiTTorch(config).to(torch.float32).eval()
    randomize_(ref, seed)
    return ref


def state_dict_numpy(module, dtype=np.float32) -> dict:
    return {k: v.detach().float().numpy().astype(dtype) for k, v in module.state_dict().items()}


def write_torch_safetensors(folder: pathlib.Path, sd_numpy: dict, base: str, shards: int = 1) -> None:
    """Write with the `safetensors` package (the reference writer), optionally sharded with an index."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)

    def to_torch(a):
        if a.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(a))

    keys = list(sd_numpy)
    if shards == 1:
        save_file({k: to_torch(sd_numpy[k]) for k in keys}, str(folder / f"{base}.safetensors"), metadata={"format": "pt"})
        return
    parts = np.array_split(np.arange(len(keys)), shards)
    weight_map = {}
    for i, idx in enumerate(parts):
        name = f"{base}-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({keys[j]: to_torch(sd_numpy[keys[j]]) for j in idx}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({keys[j]: name for j in idx})
    total = sum(a.nbytes for a in sd_numpy.values())
    (folder / f"{base}.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                       "weight_map": weight_map}))


def write_dit(folder: pathlib.Path, sd_numpy: dict, config=DIT_CONFIG, shards: int = 1) -> pathlib.Path:
    write_torch_safetensors(folder, sd_numpy, "diffusion_pytorch_model", shards)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def read_all(folder) -> dict:
    with SafetensorsCheckpoint(folder, prefer=("diffusion_pytorch_model", "model")) as r:
        return {k: r.read(k) for k in r.keys()}


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))[:10]
    for k in want:
        a, b = np.asarray(got[k]), np.asarray(want[k])
        assert a.dtype == b.dtype and a.shape == b.shape, (k, a.dtype, a.shape, b.dtype, b.shape)
        assert a.tobytes() == b.tobytes(), k
