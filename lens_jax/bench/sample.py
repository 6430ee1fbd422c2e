"""Time text-to-image sampling on random weights of a config's shapes: seconds per image split into text
encoding, denoising and decoding, and the denoiser's MFU (SPEC section 7 DiT forward FLOPs x model rows
per step: 2 per image with CFG, 1 for Turbo)."""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from lens_jax.budget.flops import dit_forward_flops
from lens_jax.budget.hardware import peak_flops_for
from lens_jax.models.dit import DiTConfig, LensDiT
from lens_jax.parallel.mesh import make_mesh
from lens_jax.parallel.placement import state_shardings
from lens_jax.sample.pipeline import LensPipeline
from lens_jax.sample.presets import get_preset
from lens_jax.text.encoder import encoder_config, load_text_encoder
from lens_jax.train.frozen import load_codec
from lens_jax.train.state import abstract_dit


def _timed(fn, repeats: int):
    out = jax.block_until_ready(fn())  # compile + first run
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = jax.block_until_ready(fn())
    return out, (time.perf_counter() - t0) / repeats


def bench_sample(cfg, *, resolution: str, preset: str, steps: int | None = None, batch: int = 1,
                 repeats: int = 2) -> dict:
    w, h = (int(v) for v in resolution.lower().split("x"))
    p = get_preset(preset)
    steps = p.steps if steps is None else int(steps)
    cfg.text_encoder.weights = ""  # random weights of the config's shapes
    cfg.codec.weights = ""
    dit_cfg = DiTConfig.from_dict(cfg.model)
    mesh = make_mesh(dict(cfg.mesh))
    with jax.set_mesh(mesh):
        codec = load_codec(cfg.codec, mesh)
        enc_graphdef, enc_params, _ = load_text_encoder(cfg.text_encoder, mesh)
        graphdef, abstract = abstract_dit(dit_cfg)
        params = jax.jit(lambda: nnx.state(LensDiT(dit_cfg, rngs=nnx.Rngs(0)), nnx.Param),
                         out_shardings=state_shardings(abstract, mesh))()
    pipe = LensPipeline(graphdef, params, enc_graphdef, enc_params, None, codec, offset=int(cfg.text_encoder.offset),
                        max_text_len=int(cfg.data.max_text_len), mesh=mesh)
    from lens_jax.sample.pipeline import check_size

    check_size(w, h, codec, allow_small=True)
    t = int(cfg.data.max_text_len)
    vocab = encoder_config(cfg.text_encoder).vocab_size
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (batch, t)).astype(np.int32)
    mask = np.ones((batch, t), bool)

    (hidden, hmask), enc_s = _timed(lambda: pipe.encode_ids(ids, mask), repeats)
    nh, nm = jax.numpy.zeros_like(hidden), jax.numpy.zeros_like(hmask)  # empty negative
    noise, sigmas = pipe.noise(0, batch, 1, w, h), pipe.sigmas(steps, w, h)
    latents, den_s = _timed(lambda: pipe.denoise(noise, sigmas, hidden, hmask, nh, nm, p.guidance), repeats)
    _, dec_s = _timed(lambda: pipe.decode(latents), repeats)

    img_tokens = (h // codec.downsample) * (w // codec.downsample)
    txt_tokens = int(hidden.shape[1])
    rows = batch * (2 if p.use_cfg else 1)
    flops = steps * rows * dit_forward_flops(dit_cfg, img_tokens, txt_tokens)
    peak = peak_flops_for(jax.devices()[0], float(cfg.hardware.peak_flops))
    return {
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "resolution": f"{w}x{h}",
        "preset": p.name,
        "steps": steps,
        "guidance": p.guidance,
        "batch": batch,
        "model_rows_per_step": rows,
        "image_tokens": img_tokens,
        "text_tokens": txt_tokens,
        "dtype": dit_cfg.dtype,
        "codec": codec.kind,
        "seconds_per_image": {"text_encoding": enc_s / batch, "denoising": den_s / batch, "decoding": dec_s / batch,
                              "total": (enc_s + den_s + dec_s) / batch},
        "denoiser_tflops_per_image": flops / batch / 1e12,
        "denoiser_mfu": flops / den_s / (peak * jax.device_count()) if peak else None,
        "peak_flops_per_device": peak,
    }
