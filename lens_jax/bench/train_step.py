"""Time the jitted train step on random data of the real shapes; report step time, tokens/s and MFU.

The batch carries latents and precomputed text features (the `precomputed` data path), so the
benchmark measures the DiT step alone, as MFU counts it (SPEC section 7: DiT FLOPs, remat not counted).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from lens_jax.budget.flops import dit_train_flops
from lens_jax.budget.hardware import peak_flops_for
from lens_jax.models.codec import codec_geometry
from lens_jax.models.dit import DiTConfig
from lens_jax.parallel.mesh import make_mesh
from lens_jax.parallel.placement import batch_sharding, host_batch_to_global, replicated
from lens_jax.train.optimizer import learning_rate_schedule, make_optimizer
from lens_jax.train.state import abstract_dit, init_train_state, train_state_shardings
from lens_jax.train.step import jit_train_step, make_train_step, step_config


def bench_train(cfg, *, bucket: str | None, layers: int | None, batch: int | None, steps: int, warmup: int) -> dict:
    if layers:
        cfg.model.num_layers = int(layers)
    dit_cfg = DiTConfig.from_dict(cfg.model)
    downsample, channels = codec_geometry(cfg.codec)
    w, h = (int(v) for v in (bucket or cfg.data.buckets.split(",")[0]).lower().split("x"))
    gh, gw = h // downsample, w // downsample
    text_tokens = int(cfg.data.max_text_len) - int(cfg.text_encoder.offset)
    b = int(batch or cfg.data.global_batch_size)
    mesh = make_mesh(dict(cfg.mesh))
    with jax.set_mesh(mesh):
        tx = make_optimizer(cfg.optimizer, int(cfg.total_steps))
        graphdef, abstract = abstract_dit(dit_cfg)
        shardings = train_state_shardings(abstract, tx, mesh, use_ema=False)
        state = init_train_state(dit_cfg, tx, 0, shardings, use_ema=False)
        step = jit_train_step(
            make_train_step(graphdef, None, tx, learning_rate_schedule(cfg.optimizer, int(cfg.total_steps)),
                            step_config(cfg)),
            shardings, lambda nd: batch_sharding(mesh, nd), {}, replicated(mesh),
        )
        rng = np.random.default_rng(0)
        text_dtype = jnp.bfloat16 if dit_cfg.dtype == "bfloat16" else jnp.float32
        host = {
            "latents": rng.standard_normal((b, gh, gw, channels), np.float32),
            "text_hidden": rng.standard_normal((b, text_tokens, dit_cfg.num_text_layers, dit_cfg.enc_hidden_dim),
                                               np.float32).astype(text_dtype),
            "text_mask": np.ones((b, text_tokens), bool),
        }
        data = host_batch_to_global(host, mesh)
        t0 = time.perf_counter()
        state, m = step(state, data, jax.random.key(0), {})
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        for i in range(warmup):
            state, m = step(state, data, jax.random.key(i + 1), {})
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for i in range(steps):
            state, m = step(state, data, jax.random.key(100 + i), {})
        jax.block_until_ready((state, m))
        step_s = (time.perf_counter() - t0) / steps
    flops = b * dit_train_flops(dit_cfg, gh * gw, text_tokens)
    peak = peak_flops_for(jax.devices()[0], float(cfg.hardware.peak_flops))
    mem = jax.devices()[0].memory_stats() or {}
    return {
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "layers": dit_cfg.num_layers,
        "bucket": f"{w}x{h}",
        "batch": b,
        "image_tokens": gh * gw,
        "text_tokens": text_tokens,
        "dtype": dit_cfg.dtype,
        "remat": dit_cfg.remat,
        "attention_impl": dit_cfg.attention_impl,
        "compile_plus_first_step_s": compile_s,
        "step_time_s": step_s,
        "images_per_s": b / step_s,
        "tokens_per_s": b * (gh * gw + text_tokens) / step_s,
        "model_tflops_per_step": flops / 1e12,
        "mfu": flops / step_s / (peak * jax.device_count()) if peak else None,
        "peak_flops_per_device": peak,
        "peak_bytes_in_use": mem.get("peak_bytes_in_use"),
        "loss": float(m["loss"]),
    }
