"""The analytic FLOPs model (lens_jax/budget/flops.py) against XLA's own count of the compiled programs.

XLA's matmul FLOPs are read from the optimised HLO (`xla_matmul_flops`: every dot and convolution,
fusions included, loop bodies times their known trip counts). The issue's bound is 2%; the model is
exact for every program here. XLA's `cost_analysis()['flops']` is printed next to it: it also counts
elementwise ops, but on this backend counts a while-loop body once (the scanned layers!) and leaves
the padded positions of a convolution out, so it is only sanity-checked against the matmul count with
every loop body taken once.

Everything is lowered and compiled only (abstract parameters where possible), never run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from conftest import REPO, micro_config
from lens_jax.budget.flops import (
    codec_encode_flops,
    dit_flops_breakdown,
    dit_forward_flops,
    dit_matmul_params,
    dit_train_flops,
    text_encoder_flops_breakdown,
    text_encoder_forward_flops,
    train_sample_flops,
    vae_encode_flops,
    xla_cost_flops,
    xla_matmul_flops,
)
from lens_jax.config import config_from_file
from lens_jax.models.dit import DiTConfig
from lens_jax.models.gpt_oss import GptOssConfig, GptOssEncoder
from lens_jax.train.state import abstract_dit

BOUND = 0.02  # the requirement: analytic within 2% of XLA's matmul count

# Three DiT shapes (>= 2 blocks: the layers run as a lax.scan, as in every real config) and two
# image grids each, always with text tokens.
DIT_CONFIGS = {
    "micro": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6),
                  mlp_hidden_dim=64, in_channels=192, out_channels=192, enc_hidden_dim=32, num_text_layers=2),
    "tiny": dict(num_layers=4, num_attention_heads=4, attention_head_dim=32, axes_dims_rope=(8, 12, 12),
                 mlp_hidden_dim=344, in_channels=48, out_channels=48, enc_hidden_dim=64, num_text_layers=2),
    "lens_shaped": dict(num_layers=3, num_attention_heads=3, attention_head_dim=16, axes_dims_rope=(4, 6, 6),
                        in_channels=128, out_channels=128, enc_hidden_dim=40, num_text_layers=4),  # mlp int(48*8/3)
}
GRIDS = {"4x4+7txt": (4, 4, 7), "6x8+13txt": (6, 8, 13)}  # (h, w, text tokens)


def _rel(xla: float, analytic: float) -> float:
    return abs(xla - analytic) / analytic


def _report(name: str, xla: float, analytic: float, compiled=None, **extra):
    parts = [f"{name}: xla matmul {xla:.6g} analytic {analytic:.6g} rel {_rel(xla, analytic):.2e}"]
    if compiled is not None:
        once = xla_matmul_flops(compiled, loop_trip_counts=False)["total"]
        parts.append(f"cost_analysis {xla_cost_flops(compiled):.6g} (matmuls, loop bodies once: {once:.6g})")
    parts += [f"{k} {v:.6g}" for k, v in extra.items()]
    print(" | ".join(parts))


def _dit_cfg(name: str, **kw) -> DiTConfig:
    return DiTConfig(**DIT_CONFIGS[name], init="fan_in", **kw)


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_dit_forward_matches_xla(name, grid):
    cfg = _dit_cfg(name)
    h, w, t = GRIDS[grid]
    b = 2
    graphdef, params = abstract_dit(cfg)

    def forward(p, x, sigma, hidden, mask):
        return nnx.merge(graphdef, p)(x, sigma, hidden, mask)

    compiled = jax.jit(forward).lower(
        params,
        jax.ShapeDtypeStruct((b, h, w, cfg.in_channels), jnp.float32),
        jax.ShapeDtypeStruct((b,), jnp.float32),
        jax.ShapeDtypeStruct((b, t, cfg.num_text_layers, cfg.enc_hidden_dim), jnp.float32),
        jax.ShapeDtypeStruct((b, t), jnp.bool_),
    ).compile()
    xla = xla_matmul_flops(compiled)
    analytic = b * dit_forward_flops(cfg, h * w, t)
    _report(f"DiT forward {name} {grid}", xla["total"], analytic, compiled)
    assert xla["convolution"] == 0 and not xla["custom_calls"]
    assert [trips for _, trips in xla["loops"]] == [cfg.num_layers]  # the scan over the blocks
    assert _rel(xla["total"], analytic) < BOUND
    # XLA's own total: elementwise work on top of the matmuls, but loop bodies only once.
    once = xla_matmul_flops(compiled, loop_trip_counts=False)["total"]
    assert once <= xla_cost_flops(compiled) <= 3 * once


def _train_step_parts(run_cfg, encoder_graphdef=None):
    from lens_jax.train.optimizer import learning_rate_schedule, make_optimizer
    from lens_jax.train.state import TrainState
    from lens_jax.train.step import make_train_step, step_config

    dit_cfg = DiTConfig.from_dict(run_cfg.model)
    tx = make_optimizer(run_cfg.optimizer, int(run_cfg.total_steps))
    graphdef, params = abstract_dit(dit_cfg)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                       opt_state=jax.eval_shape(tx.init, params), ema=None)
    step = make_train_step(graphdef, encoder_graphdef, tx, learning_rate_schedule(run_cfg.optimizer, 10),
                           step_config(run_cfg))
    return dit_cfg, state, step


def _run_cfg(tmp_path, name: str, **overrides):
    fields = {f"model.{k}": v for k, v in DIT_CONFIGS[name].items()}
    return micro_config(tmp_path, **{**fields, **overrides})


# A train step compiles in seconds even at -O0: each config once, the two grids spread over them
# (the forward above covers every config x grid; the step's backward adds nothing grid-specific).
TRAIN_CASES = [("micro", "4x4+7txt"), ("tiny", "6x8+13txt"), ("lens_shaped", "6x8+13txt")]


@pytest.mark.parametrize("name,grid", TRAIN_CASES)
def test_dit_train_step_matches_xla(tmp_path, name, grid):
    """The real train step (make_train_step, AdamW, loss, grad clip; remat off) on precomputed latents
    and text features: XLA's matmuls are exactly dit_train_flops(exact=True); the model-FLOPs
    convention (3 x forward) is above it by the input gradients of img_in and time_linear_1."""
    run_cfg = _run_cfg(tmp_path, name)
    dit_cfg, state, step = _train_step_parts(run_cfg)
    assert dit_cfg.remat == "none"
    h, w, t = GRIDS[grid]
    b = 4
    batch = {
        "latents": jax.ShapeDtypeStruct((b, h, w, dit_cfg.in_channels), jnp.float32),
        "text_hidden": jax.ShapeDtypeStruct((b, t, dit_cfg.num_text_layers, dit_cfg.enc_hidden_dim), jnp.float32),
        "text_mask": jax.ShapeDtypeStruct((b, t), jnp.bool_),
    }
    compiled = jax.jit(step).lower(state, batch, jax.random.key(0), {}).compile()
    xla = xla_matmul_flops(compiled)
    exact = b * dit_train_flops(dit_cfg, h * w, t, exact=True)
    model = b * dit_train_flops(dit_cfg, h * w, t)
    _report(f"DiT train step {name} {grid}", xla["total"], exact, compiled, model_flops_3x_forward=model,
            model_over_xla=model / xla["total"])
    assert not xla["custom_calls"]
    assert _rel(xla["total"], exact) < BOUND
    parts = dit_flops_breakdown(dit_cfg, h * w, t)
    assert model - exact == pytest.approx(b * (parts["img_in"] + parts["time_linear_1"]))
    assert model == pytest.approx(3 * b * dit_forward_flops(dit_cfg, h * w, t))


def test_train_step_with_text_encoder_and_vae_matches_xla(tmp_path):
    """The step that runs the frozen GPT-OSS (micro config: 'dense' MoE, every expert computed; the
    'blocked' one is checked in test_text_encoder_forward_matches_xla) and the FLUX.2-architecture VAE itself: XLA's matmuls =
    DiT train (exact) + encoder forward (as computed) + VAE encode."""
    from lens_jax.models.codec import flux2_vae_config, make_codec
    from lens_jax.models.flux2_vae import Flux2VAE
    from lens_jax.text.encoder import abstract_encoder, encoder_config

    offset = 3
    run_cfg = _run_cfg(
        tmp_path, "micro",
        **{"codec.kind": "flux2", "model.in_channels": 32, "model.out_channels": 32, "text_encoder.offset": offset,
           "codec.vae": dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=8, norm_num_groups=8)},
    )
    enc_cfg = encoder_config(run_cfg.text_encoder)
    enc_graphdef, enc_params = abstract_encoder(enc_cfg)
    codec = make_codec(run_cfg.codec, Flux2VAE(flux2_vae_config(run_cfg.codec), rngs=nnx.Rngs(0)))
    dit_cfg, state, step = _train_step_parts(run_cfg, enc_graphdef)
    b, height, width, seq = 4, 64, 32, 12
    batch = {
        "images": jax.ShapeDtypeStruct((b, height, width, 3), jnp.uint8),
        "text_ids": jax.ShapeDtypeStruct((b, seq), jnp.int32),
        "text_mask": jax.ShapeDtypeStruct((b, seq), jnp.bool_),
    }
    compiled = jax.jit(step).lower(state, batch, jax.random.key(0), {"text_encoder": enc_params, "codec": codec}).compile()
    xla = xla_matmul_flops(compiled)
    image_tokens = (height // codec.downsample) * (width // codec.downsample)
    dit = dit_train_flops(dit_cfg, image_tokens, seq - offset, exact=True)
    enc = text_encoder_forward_flops(enc_cfg, seq, experts="computed", batch=b)
    vae = codec_encode_flops(codec, height, width)
    analytic = b * (dit + enc + vae)
    sample = train_sample_flops(run_cfg, width, height, seq - offset)
    _report("train step + GPT-OSS + VAE", xla["total"], analytic, compiled, dit_train_exact=b * dit,
            text_encoder_computed=b * enc, vae_encode=b * vae, train_sample_flops_total=b * sample["total"])
    assert xla["convolution"] > 0  # the VAE (XLA turns some of its 1x1 convolutions into dots)
    assert _rel(xla["total"], analytic) < BOUND
    # train_sample_flops: model FLOPs (3 x forward DiT, active experts), the same VAE.
    assert sample["dit_train"] == dit_train_flops(dit_cfg, image_tokens, seq - offset)
    assert sample["text_encoder"] == text_encoder_forward_flops(enc_cfg, seq)
    assert sample["vae_encode"] == vae
    assert sample["total"] == pytest.approx(sample["dit_train"] + sample["text_encoder"] + sample["vae_encode"])
    pre = train_sample_flops(run_cfg, width, height, seq - offset, precomputed=True)
    assert pre == {"dit_train": sample["dit_train"], "text_encoder": 0.0, "vae_encode": 0.0, "total": sample["dit_train"]}


ENCODER = dict(vocab_size=128, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, num_local_experts=8, num_experts_per_tok=2, intermediate_size=48, sliding_window=8,
               selected_layers=(1, 3), dtype="float32")


@pytest.mark.parametrize("moe_impl", ["blocked", "dense", "ragged"])
def test_text_encoder_forward_matches_xla(moe_impl):
    """Layers 0..3 of 5 run (the last selected is 3). 'blocked' and 'dense' are exact as computed;
    XLA:CPU expands 'ragged' to a dense matmul over every expert (ragged='expanded')."""
    cfg = GptOssConfig(**ENCODER, moe_impl=moe_impl)
    b, t = 3, 20
    graphdef, params = nnx.split(GptOssEncoder(cfg, rngs=nnx.Rngs(0)))
    compiled = jax.jit(lambda p, ids, m: nnx.merge(graphdef, p)(ids, m)).lower(
        params, jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.bool_)).compile()
    xla = xla_matmul_flops(compiled)
    computed = b * text_encoder_forward_flops(cfg, t, experts="computed", batch=b, ragged="expanded")
    active = b * text_encoder_forward_flops(cfg, t)
    _report(f"GPT-OSS forward moe_impl={moe_impl}", xla["total"], computed, compiled, active_experts=active)
    assert _rel(xla["total"], computed) < BOUND
    assert set(xla["custom_calls"]) <= {"TopK"}  # the router's top-k: no matmul hidden in a custom call
    assert computed >= active
    # Only the expert rows differ between 'active' and 'computed'.
    a = text_encoder_flops_breakdown(cfg, t)
    c = text_encoder_flops_breakdown(cfg, t, experts="computed", batch=b, ragged="expanded")
    assert {k for k in c if c[k] != a.get(k)} <= {"experts_gate_up", "experts_down", "experts_combine"}


def test_text_encoder_conventions():
    cfg = GptOssConfig(**ENCODER, moe_impl="blocked")
    t = 20
    dense = text_encoder_flops_breakdown(cfg, t)
    visible = text_encoder_flops_breakdown(cfg, t, attention="visible")
    # Layers 0, 2 slide (window 8), 1, 3 are causal: visible (query, key) pairs, 4 layers run.
    causal = t * (t + 1) / 2
    window = 8 * 9 / 2 + (t - 8) * 8
    assert visible["attention_scores"] == pytest.approx(2 * 4 * 16 * (2 * causal + 2 * window))
    assert dense["attention_scores"] == pytest.approx(2 * 4 * 16 * 4 * t * t)
    # Stopping after the last selected layer: selecting layer 4 (of 5) costs 5/4 of the non-attention work.
    all_layers = text_encoder_flops_breakdown(GptOssConfig(**{**ENCODER, "selected_layers": (1, 4)}), t)
    assert all_layers["q_proj"] == pytest.approx(dense["q_proj"] * 5 / 4)


def test_gpt_oss_20b_active_parameters():
    """GPT-OSS-20B's model card: 3.61B active parameters per token, of which the unembedding (0.58B;
    the encoder never runs lm_head) is not ours: per token the encoder's non-attention matmuls touch
    3.03B weights (24 layers: q/k/v/o 26.5M, router 92K, 4 of 32 experts 99.5M)."""
    cfg = GptOssConfig()
    parts = text_encoder_flops_breakdown(cfg, 1)
    per_token = sum(v for k, v in parts.items() if not k.startswith("attention")) / 2
    unembed = 201088 * 2880
    assert per_token == pytest.approx(3.61e9 - unembed, rel=0.01)
    # 512 tokens (the pipeline's cap, preamble included): dense attention adds 4 * 512^2 * 4096 per layer.
    total = text_encoder_forward_flops(cfg, 512)
    assert total == pytest.approx(2 * per_token * 512 + 24 * 4 * 512**2 * 4096)


VAE_CASES = {
    "tiny_vae@32x48": (dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=8, norm_num_groups=8), 32, 48),
    "4_blocks@64x32": (dict(block_out_channels=(8, 16, 32, 32), layers_per_block=2, latent_channels=4, norm_num_groups=8), 64, 32),
}


@pytest.mark.parametrize("case", list(VAE_CASES))
def test_vae_encode_matches_xla(case):
    from lens_jax.models.codec import make_codec
    from lens_jax.models.flux2_vae import Flux2VAE, Flux2VAEConfig

    vae_fields, height, width = VAE_CASES[case]
    codec_cfg = {"kind": "flux2", "vae": vae_fields}
    vae_cfg = Flux2VAEConfig(**vae_fields)
    codec = make_codec(ml_collections.ConfigDict(codec_cfg), Flux2VAE(vae_cfg, rngs=nnx.Rngs(0)))
    b = 2
    compiled = jax.jit(lambda c, im: c.encode(im)).lower(codec, jax.ShapeDtypeStruct((b, height, width, 3), jnp.uint8)).compile()
    xla = xla_matmul_flops(compiled)
    analytic = b * vae_encode_flops(vae_cfg, height, width)
    _report(f"VAE encode {case}", xla["total"], analytic, compiled, convolutions=xla["convolution"])
    assert _rel(xla["total"], analytic) < BOUND
    # cost_analysis leaves a convolution's padded positions out: a little below the matmul count.
    assert 0.8 * xla["total"] <= xla_cost_flops(compiled) <= 1.2 * xla["total"]
    # Every way of naming the codec gives the same number; the pixel codec costs nothing.
    assert codec_encode_flops(codec, height, width) == codec_encode_flops(codec_cfg, height, width) == analytic / b
    assert codec_encode_flops(vae_cfg, height, width) == analytic / b
    assert codec_encode_flops({"kind": "pixel", "patch": 8}, height, width) == 0.0


def test_dit_breakdown_and_spec_form():
    """The named terms sum to the forward, and equal SPEC section 7's per-stream form."""
    for name in DIT_CONFIGS:
        cfg = _dit_cfg(name)
        ti, tt = 48, 13
        parts = dit_flops_breakdown(cfg, ti, tt)
        p = dit_matmul_params(cfg)
        spec = 2 * (p.image_token * ti + p.text_token * tt + p.per_sample) + 4 * cfg.num_layers * cfg.inner_dim * (ti + tt) ** 2
        assert sum(parts.values()) == pytest.approx(spec) == pytest.approx(dit_forward_flops(cfg, ti, tt))


def test_lens_3p8b_forward_at_1024():
    """configs/lens_3p8b.py at 1024^2 (4096 image tokens) with 150 text tokens, against a hand
    calculation and SPEC section 7's ~1.65e13 floor (which is about 100 text tokens)."""
    run_cfg = config_from_file(REPO / "configs" / "lens_3p8b.py")
    cfg = DiTConfig.from_dict(run_cfg.model)
    ti, tt = 4096, 150
    d, m, layers = 1536, 4096, 48
    per_token_block = 3 * d * d + d * d + 3 * d * m  # qkv, out, SwiGLU: 28,311,552 weights per stream
    hand = (
        2 * layers * per_token_block * (ti + tt)  # both streams' blocks: 1.154e13
        + 4 * layers * d * (ti + tt) ** 2  # joint attention, non-causal: 5.317e12
        + 2 * 128 * d * ti + 2 * d * 128 * ti  # img_in, proj_out
        + 2 * 4 * 2880 * d * tt  # txt_in over 4 x 2880 features
        + 2 * (256 * d + d * d + layers * 2 * 6 * d * d + 2 * d * d)  # once per sample
    )
    fwd = dit_forward_flops(cfg, ti, tt)
    print(f"lens_3p8b forward at 1024^2 + {tt} text tokens: {fwd:.4e} (SPEC floor ~1.65e13); "
          f"train 3x {dit_train_flops(cfg, ti, tt):.4e}, executed {dit_train_flops(cfg, ti, tt, exact=True):.4e}")
    assert fwd == pytest.approx(hand, rel=1e-12)
    assert fwd == pytest.approx(1.65e13, rel=0.03)
    assert dit_forward_flops(cfg, ti, 100) == pytest.approx(1.65e13, rel=0.01)
    # The input-gradient matmuls XLA skips are negligible at this shape.
    assert dit_train_flops(cfg, ti, tt, exact=True) == pytest.approx(dit_train_flops(cfg, ti, tt), rel=1e-3)


def test_train_sample_flops_lens_3p8b():
    """Stage 1 (512^2, 415 DiT text tokens after the 97-token preamble): the frozen parts' share."""
    run_cfg = config_from_file(REPO / "configs" / "lens_3p8b.py")
    cfg = DiTConfig.from_dict(run_cfg.model)
    out = train_sample_flops(run_cfg, 512, 512)
    assert out["dit_train"] == dit_train_flops(cfg, 1024, 512 - 97)
    assert out["text_encoder"] == text_encoder_forward_flops(GptOssConfig(), 512)
    from lens_jax.models.flux2_vae import Flux2VAEConfig

    assert out["vae_encode"] == vae_encode_flops(Flux2VAEConfig(), 512, 512)
    assert out["total"] == pytest.approx(out["dit_train"] + out["text_encoder"] + out["vae_encode"])
    print("lens_3p8b 512^2 per sample:", {k: f"{v:.3e}" for k, v in out.items()})
    assert train_sample_flops(run_cfg, 512, 512, precomputed=True)["total"] == out["dit_train"]
    tiny = train_sample_flops(config_from_file(REPO / "configs" / "tiny.py"), 32, 32)
    assert tiny["vae_encode"] == 0.0 and tiny["text_encoder"] > 0
