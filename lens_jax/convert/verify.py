"""Numerical check of a conversion: the PyTorch reference and the Flax port on the same random inputs.

lens-dit: the PyTorch reference module (lens_jax/convert/reference/lens_dit_torch.py) loaded with
strict=True from the official files; gpt-oss: transformers' GptOssForCausalLM (an `original/`
checkpoint is first re-exported to the transformers layout by this converter, since transformers
cannot read it); flux2-vae: diffusers' AutoencoderKLFlux2 (a BFL `ae.safetensors` is first
re-exported to the diffusers layout). Besides the outputs, every weight is mapped back through the
key table and compared with the PyTorch state dict (weights the outputs cannot see included). The Flax side is `--dst` (a converted directory) or, without it, an import of
`--src` made on the fly. Both run in float32. Per output it prints the max abs and max relative
(max abs / max |reference|) error; OK when max_abs <= atol + rtol * max|reference| for every output.
"""

from __future__ import annotations

import pathlib
import tempfile
from typing import Callable

import numpy as np

from lens_jax.convert.common import ConvertError

INSTALL_HINT = ("verify needs PyTorch (and transformers for gpt-oss, diffusers for flux2-vae): install the test extra "
                "with `pip install -e .[test]`")


def _torch():
    try:
        import torch
    except ImportError:
        raise ConvertError(INSTALL_HINT) from None
    return torch


def _compare(name, got, want, mask=None):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise ConvertError(f"verify: {name} has shape {got.shape} in Flax but {want.shape} in PyTorch")
    if mask is not None:
        got, want = got[mask], want[mask]
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    finite = bool(np.isfinite(got).all() and np.isfinite(want).all())
    return {"name": name, "max_abs": err if finite else float("inf"), "max_rel": err / scale if scale else err,
            "scale": scale}


def verify(kind: str, src, dst=None, *, seed: int = 0, atol: float = 1e-4, rtol: float = 1e-4,
           seq_len: int | None = None, batch: int = 2, config=None, log: Callable[[str], None] = print) -> bool:
    """Run both sides and print the comparison; returns True when every output is within tolerance."""
    from lens_jax.convert.importer import import_checkpoint, resolve_src
    from lens_jax.convert.kinds import get_kind

    _torch()
    k = get_kind(kind)
    folder, _ = resolve_src(k, src)
    with tempfile.TemporaryDirectory(prefix="lens_jax_verify_") as tmp:
        if dst is None:
            dst = pathlib.Path(tmp) / "converted"
            import_checkpoint(kind, src, dst, config=config, log=log)
        if k.name == "lens-dit":
            rows = _verify_dit(folder, dst, seed)
        elif k.name == "gpt-oss":
            rows = _verify_gpt_oss(folder, dst, seed, seq_len, batch, pathlib.Path(tmp))
        elif k.name == "flux2-vae":
            rows = _verify_vae(folder, dst, seed, pathlib.Path(tmp))
        else:
            raise ConvertError(f"verify --kind {kind} is not available")
    ok = True
    worst = 0.0
    for r in rows:
        good = r["max_abs"] <= atol + rtol * r["scale"]
        ok &= good
        worst = max(worst, r["max_abs"])
        log(f"  {r['name']}: max_abs={r['max_abs']:.3e} max_rel={r['max_rel']:.3e} (max|ref|={r['scale']:.3g})"
            f"{'' if good else '  <-- over tolerance'}")
    log(f"verify {kind}: max_abs={worst:.3e} {'OK' if ok else 'FAIL'}")
    return ok


def _weights_row(spec, params, torch_sd: dict):
    """Every parameter, mapped back through the key table, against the PyTorch state dict
    (catches weights the outputs cannot see, e.g. the last block's text-stream MLP)."""
    from flax import nnx

    flat = {p: np.asarray(v.get_value() if hasattr(v, "get_value") else v, np.float32)
            for p, v in nnx.to_flat_state(params)}
    worst, scale, n = 0.0, 0.0, 0
    for e in spec.entries:
        slots = [flat[t.path] if t.index is None else flat[t.path][t.index] for t in e.targets]
        for key, a in zip(e.keys, e.from_nnx(slots)):
            if key not in torch_sd:
                raise ConvertError(f"verify: the PyTorch model has no {key!r}")
            want = torch_sd[key]
            if tuple(want.shape) != tuple(a.shape):
                raise ConvertError(f"verify: {key} is {tuple(want.shape)} in PyTorch but {tuple(a.shape)} in Flax")
            worst = max(worst, float(np.max(np.abs(a - want))) if a.size else 0.0)
            scale = max(scale, float(np.max(np.abs(want))) if want.size else 0.0)
            n += 1
    return {"name": f"weights ({n} tensors)", "max_abs": worst, "max_rel": worst / scale if scale else worst,
            "scale": scale}


def _read_state_dict(folder, prefer, torch):
    from lens_jax.convert.safetensors_io import SafetensorsCheckpoint

    with SafetensorsCheckpoint(folder, prefer=prefer) as reader:
        return {key: torch.from_numpy(reader.read(key, np.float32)) for key in reader.keys()}


def _verify_dit(folder: pathlib.Path, dst, seed: int):
    torch = _torch()
    from flax import nnx

    from lens_jax.convert.checkpoint_io import load_converted
    from lens_jax.convert.kinds import read_json
    from lens_jax.convert.reference.lens_dit_torch import LensDiTTorch

    config = read_json(folder / "config.json")
    ref = LensDiTTorch(config).to(torch.float32).eval()
    sd = _read_state_dict(folder, ("diffusion_pytorch_model", "model"), torch)
    result = ref.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConvertError(f"the PyTorch reference rejects {folder}: missing {result.missing_keys[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    del sd
    spec, graphdef, params = load_converted(dst, dtype="float32")
    weights = _weights_row(spec, params, {k: v.detach().numpy() for k, v in ref.state_dict().items()})
    model = nnx.merge(graphdef, params)
    cfg = spec.config
    rng = np.random.default_rng(seed)
    B, h, w, T = 2, 3, 5, 6  # non-square grid; row 1's text is padded
    x = rng.standard_normal((B, h, w, cfg.in_channels)).astype(np.float32)
    sigma = np.array([0.3, 0.85], np.float32)
    th = rng.standard_normal((B, T, cfg.num_text_layers, cfg.enc_hidden_dim)).astype(np.float32)
    mask = np.arange(T)[None, :] < np.array([T, 3])[:, None]
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(sigma), torch.from_numpy(th), torch.from_numpy(mask)).numpy()
    got = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, x, sigma, th, mask))
    return [_compare("velocity", got, want), weights]


def _hf_model(folder: pathlib.Path, torch, transformers):
    """transformers' GptOssForCausalLM in float32 from a transformers-layout folder.

    Plain checkpoints load with from_pretrained. MXFP4 ones do too where transformers can (it needs
    accelerate on CPU); otherwise the model is built from its config and the experts are dequantised
    with transformers' own `convert_moe_packed_tensors` (never with this converter's code).
    """
    from lens_jax.convert.kinds import read_json
    from lens_jax.convert.safetensors_io import SafetensorsCheckpoint

    config = read_json(folder / "config.json") or {}
    if "quantization_config" not in config:
        return transformers.GptOssForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                              attn_implementation="eager").float().eval()
    try:
        return transformers.GptOssForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                              attn_implementation="eager").float().eval()
    except ImportError:
        pass
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    config = {k: v for k, v in config.items() if k != "quantization_config"}
    hf_cfg = transformers.GptOssConfig(**config)
    hf_cfg._attn_implementation = "eager"
    model = transformers.GptOssForCausalLM(hf_cfg).float().eval()
    sd = {}
    with SafetensorsCheckpoint(folder, prefer=("model",)) as reader:
        for key in reader.keys():
            if key.endswith("_scales"):
                continue
            if key.endswith("_blocks"):
                base = key[: -len("_blocks")]
                blocks = torch.from_numpy(reader.read(key))
                scales = torch.from_numpy(reader.read(base + "_scales"))
                sd[base] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            else:
                sd[key] = torch.from_numpy(reader.read(key, np.float32))
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConvertError(f"transformers rejects {folder}: missing {result.missing_keys[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    return model


def _reference_layout(folder: pathlib.Path, dst, tmp: pathlib.Path, *, foreign: str, reference: str) -> pathlib.Path:
    """The source folder, or, when it uses a naming the reference library cannot read (OpenAI `original/`,
    BFL `ae.safetensors`), a float32 re-export of the converted weights in the reference library's layout."""
    from lens_jax.convert.checkpoint_io import read_meta
    from lens_jax.convert.exporter import export_checkpoint

    if (read_meta(dst).get("source") or {}).get("format") != foreign:
        return folder
    out = tmp / f"as_{reference}"
    export_checkpoint(dst, out, fmt=reference, dtype="float32", log=None)
    return out


def _verify_gpt_oss(folder: pathlib.Path, dst, seed: int, seq_len, batch: int, tmp: pathlib.Path):
    torch = _torch()
    try:
        import transformers
    except ImportError:
        raise ConvertError(INSTALL_HINT) from None
    from flax import nnx

    from lens_jax.convert.checkpoint_io import load_converted

    hf_dir = _reference_layout(folder, dst, tmp, foreign="original", reference="transformers")
    hf = _hf_model(hf_dir, torch, transformers)
    spec, graphdef, params = load_converted(dst, dtype="float32")
    enc = nnx.merge(graphdef, params)
    cfg = spec.config
    T = int(seq_len or max(12, cfg.sliding_window + 5))
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, size=(batch, T)).astype(np.int32)
    lengths = [T] + [max(1, (T * 2) // 3)] * (batch - 1)
    mask = np.arange(T)[None, :] < np.array(lengths)[:, None]
    # raw residual outputs of the decoder layers (hidden_states[-1] would be post-final-norm)
    captured = {}
    hooks = [hf.model.layers[i].register_forward_hook(
        lambda mod, args, out, i=i: captured.__setitem__(i, (out[0] if isinstance(out, tuple) else out).detach()))
        for i in cfg.selected_layers]
    try:
        with torch.no_grad():
            out = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    finally:
        for h in hooks:
            h.remove()
    feats = np.asarray(nnx.jit(lambda m, i, k: m(i, k))(enc, ids, mask))
    rows = []
    for j, layer in enumerate(cfg.selected_layers):
        rows.append(_compare(f"layer {layer} output", feats[:, :, j], captured[layer].float().numpy(), mask))
    if spec.extras.get("include_lm_head"):
        logits = np.asarray(nnx.jit(lambda m, i, k: m.logits(i, k))(enc, ids, mask))
        rows.append(_compare("logits", logits, out.logits.float().numpy(), mask))
    from lens_jax.convert import keys_gpt_oss
    from lens_jax.convert.kinds import Spec

    as_hf = Spec(spec.kind, "transformers", cfg, keys_gpt_oss.entries(cfg, "transformers", bool(spec.extras.get("include_lm_head"))))
    rows.append(_weights_row(as_hf, params, {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}))
    return rows


def _verify_vae(folder: pathlib.Path, dst, seed: int, tmp: pathlib.Path):
    torch = _torch()
    try:
        import diffusers
    except ImportError:
        raise ConvertError(INSTALL_HINT) from None
    from flax import nnx

    from lens_jax.convert.checkpoint_io import load_converted

    ref_dir = _reference_layout(folder, dst, tmp, foreign="bfl", reference="diffusers")
    ref = diffusers.AutoencoderKLFlux2.from_pretrained(str(ref_dir), torch_dtype=torch.float32).float().eval()
    spec, graphdef, state = load_converted(dst, dtype="float32")
    vae = nnx.merge(graphdef, state)
    cfg = spec.config
    f = cfg.vae_downsample
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (2, 2 * f, 3 * f, cfg.in_channels)).astype(np.float32)  # non-square
    z = rng.standard_normal((2, 3, 2, cfg.latent_channels)).astype(np.float32)
    with torch.no_grad():
        mean_t = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist.mode().permute(0, 2, 3, 1).numpy()
        dec_t = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    mean_j = np.asarray(nnx.jit(lambda m, a: m.encode(a)[0])(vae, x))
    dec_j = np.asarray(nnx.jit(lambda m, a: m.decode(a))(vae, z))
    sd = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
    from lens_jax.convert import keys_flux2_vae
    from lens_jax.convert.kinds import Spec

    as_diffusers = Spec(spec.kind, "diffusers", cfg, keys_flux2_vae.entries(cfg, "diffusers"))
    return [_compare("encode (posterior mode)", mean_j, mean_t), _compare("decode", dec_j, dec_t),
            _weights_row(as_diffusers, state, sd)]
