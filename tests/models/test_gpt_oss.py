"""GPT-OSS encoder: parity with transformers' GptOssForCausalLM on a tiny random model, config
handling, parameter counts, and that layers after the last selected one are never computed."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lens_jax.models.gpt_oss import (
    GptOssConfig,
    GptOssEncoder,
    gpt_oss_param_count,
    yarn_inv_freq,
)
from lens_jax.parallel.rules import logical_to_spec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SELECTED = (1, 2, 4)  # of 6 layers: layer 5 must not run; hidden_states[6] (post-norm) is never compared
# RoPE: original context 8 < sequence 12, and betas chosen so the YaRN ramp blends dims 2..4 of 8
# (with the official betas a head_dim-16 model would interpolate every dim but one).
TINY_HF = dict(
    vocab_size=100,
    hidden_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    intermediate_size=64,
    sliding_window=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    swiglu_limit=1.0,  # small, so the clamps bind on this tiny model (checked below)
    rope_parameters=dict(
        rope_type="yarn", rope_theta=100.0, factor=32.0, beta_fast=0.5, beta_slow=0.1,
        truncate=False, original_max_position_embeddings=8,
    ),
)
SEQ_LEN = 12
LENGTHS = (12, 9, 3)  # right padding; row 2 has queries whose sliding window holds only padding


def _hf_config(**kw):
    return transformers.GptOssConfig(**{**TINY_HF, **kw}, attn_implementation="eager")


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(_hf_config()).eval().float()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            randn = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.2 * randn)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(randn)
            elif name.endswith("sinks"):
                p.copy_(randn)
            elif name.endswith("bias"):
                p.copy_(0.1 * randn)
            elif name.endswith("gate_up_proj") or name.endswith("down_proj"):
                p.copy_(randn / np.sqrt(p.shape[1]))  # [E, in, out]
            else:  # torch Linear [out, in]
                p.copy_(randn / np.sqrt(p.shape[-1]))
    return model


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY_HF["vocab_size"], size=(len(LENGTHS), SEQ_LEN)).astype(np.int32)
    mask = np.arange(SEQ_LEN)[None, :] < np.array(LENGTHS)[:, None]
    return ids, mask


@pytest.fixture(scope="module")
def hf_outputs(hf_model, batch):
    ids, mask = batch
    captured = []
    hook = hf_model.model.layers[0].mlp.experts.register_forward_hook(lambda m, a, o: captured.append(a[0]))
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            output_hidden_states=True,
        )
    hook.remove()
    experts = hf_model.model.layers[0].mlp.experts
    gate_up = torch.einsum("nd,edf->nef", captured[0], experts.gate_up_proj.detach()) + experts.gate_up_proj_bias.detach()
    return out, gate_up


def load_hf_weights(enc: GptOssEncoder, model) -> None:
    """Copy a transformers GptOssForCausalLM state dict into the encoder (the table in gpt_oss.py)."""
    cfg = enc.cfg
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    D, H, K, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def stack(key, fn=lambda a: a):
        return np.stack([fn(sd[f"model.layers.{i}.{key}"]) for i in range(cfg.num_hidden_layers)])

    layers = {
        "input_layernorm": {"weight": stack("input_layernorm.weight")},
        "post_attention_layernorm": {"weight": stack("post_attention_layernorm.weight")},
        "q_proj": {"kernel": stack("self_attn.q_proj.weight", lambda w: w.T.reshape(D, H, d)),
                   "bias": stack("self_attn.q_proj.bias", lambda b: b.reshape(H, d))},
        "k_proj": {"kernel": stack("self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, d)),
                   "bias": stack("self_attn.k_proj.bias", lambda b: b.reshape(K, d))},
        "v_proj": {"kernel": stack("self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, d)),
                   "bias": stack("self_attn.v_proj.bias", lambda b: b.reshape(K, d))},
        "o_proj": {"kernel": stack("self_attn.o_proj.weight", lambda w: w.T.reshape(H, d, D)),
                   "bias": stack("self_attn.o_proj.bias")},
        "sinks": stack("self_attn.sinks"),
        "router": {"kernel": stack("mlp.router.weight", lambda w: w.T), "bias": stack("mlp.router.bias")},
        "gate_up_proj": stack("mlp.experts.gate_up_proj"),
        "gate_up_proj_bias": stack("mlp.experts.gate_up_proj_bias"),
        "down_proj": stack("mlp.experts.down_proj"),
        "down_proj_bias": stack("mlp.experts.down_proj_bias"),
    }
    tree = {"embed_tokens": sd["model.embed_tokens.weight"], "layers": layers, "norm": {"weight": sd["model.norm.weight"]}}
    if enc.lm_head is not None:
        tree["lm_head"] = {"kernel": sd["lm_head.weight"].T}

    state = nnx.state(enc, nnx.Param)
    seen = 0
    for path, var in nnx.to_flat_state(state):
        src = tree
        for p in path:
            src = src[p]
        assert src.shape == var.get_value().shape, (path, src.shape, var.get_value().shape)
        var.set_value(jnp.asarray(src, var.get_value().dtype))
        seen += 1
    n_tree = len(jax.tree.leaves(tree))
    assert seen == n_tree, f"state has {seen} params, table has {n_tree}"
    nnx.update(enc, state)


def _encoder(hf_model, include_lm_head=False, **overrides) -> GptOssEncoder:
    """Built abstractly (no random init: fast) and filled from the torch weights."""
    cfg = GptOssConfig.from_hf_config(
        hf_model.config.to_dict(), selected_layers=SELECTED, dtype="float32", **overrides
    )
    enc = nnx.eval_shape(lambda: GptOssEncoder(cfg, rngs=nnx.Rngs(0), include_lm_head=include_lm_head))
    load_hf_weights(enc, hf_model)
    return enc


@nnx.jit
def _encode(enc, ids, mask):
    return enc(ids, mask)


@pytest.fixture(scope="module")
def features(hf_model, batch):
    """Memoised encoder features on `batch`, keyed by config overrides."""
    cache = {}

    def get(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            enc = _encoder(hf_model, **overrides)
            cache[key] = np.asarray(_encode(enc, *map(jnp.asarray, batch)))
        return cache[key]

    return get


def test_test_model_exercises_the_edge_cases(hf_model, hf_outputs):
    _, gate_up = hf_outputs
    limit = TINY_HF["swiglu_limit"]
    assert (gate_up[..., ::2] > limit).any() and (gate_up[..., 1::2].abs() > limit).any()
    for layer in hf_model.model.layers:
        assert layer.self_attn.sinks.abs().min() > 0
        assert layer.mlp.experts.down_proj_bias.abs().min() > 0
    assert SEQ_LEN > TINY_HF["sliding_window"]
    assert SEQ_LEN > TINY_HF["rope_parameters"]["original_max_position_embeddings"]


@pytest.mark.parametrize("moe_impl", ["ragged", "blocked", "dense"])
def test_matches_transformers(hf_outputs, features, moe_impl):
    out, _ = hf_outputs
    feats = features(moe_impl=moe_impl)
    assert feats.shape == (len(LENGTHS), SEQ_LEN, len(SELECTED), TINY_HF["hidden_size"])
    assert np.isfinite(feats).all()  # padded rows included
    for j, layer in enumerate(SELECTED):
        ref = out.hidden_states[layer + 1].numpy()  # hidden_states[i + 1] = output of layer i
        for b, n in enumerate(LENGTHS):
            err = np.abs(feats[b, :n, j] - ref[b, :n]).max()
            assert err < 1e-4, (moe_impl, layer, b, err)
    assert np.abs(out.hidden_states[SELECTED[-1] + 1].numpy()).max() > 1.0  # not a trivially tiny signal


def test_moe_impls_agree_everywhere_and_block_sizes(features):
    ref = features(moe_impl="dense")  # padded positions included
    for kw in (dict(moe_impl="ragged"), dict(moe_impl="blocked"), dict(moe_impl="blocked", moe_block_size=1)):
        assert np.abs(features(**kw) - ref).max() < 1e-5, kw


def test_logits_and_final_norm_match_transformers(hf_model, hf_outputs, batch):
    out, _ = hf_outputs
    ids, mask = batch
    enc = _encoder(hf_model, include_lm_head=True, moe_impl="ragged")
    final, logits = nnx.jit(lambda m, i, k: (m.final_hidden(i, k), m.logits(i, k)))(enc, jnp.asarray(ids), jnp.asarray(mask))
    final, logits = np.asarray(final), np.asarray(logits)
    for b, n in enumerate(LENGTHS):
        assert np.abs(final[b, :n] - out.hidden_states[-1].numpy()[b, :n]).max() < 1e-4
        assert np.abs(logits[b, :n] - out.logits.numpy()[b, :n]).max() < 1e-4


def test_no_nan_for_fully_padded_rows(hf_model):
    enc = _encoder(hf_model, moe_impl="blocked")
    ids = jnp.zeros((len(LENGTHS), SEQ_LEN), jnp.int32)
    mask = jnp.zeros((len(LENGTHS), SEQ_LEN), bool).at[1, :2].set(True)  # rows 0 and 2: no tokens at all
    assert np.isfinite(np.asarray(_encode(enc, ids, mask))).all()


def test_stops_after_last_selected_layer(hf_model, batch):
    enc = _encoder(hf_model, moe_impl="dense")
    graphdef, state = nnx.split(enc)
    ids, mask = map(jnp.asarray, batch)
    jaxpr = jax.make_jaxpr(lambda s, i, m: nnx.merge(graphdef, s)(i, m))(state, ids, mask)

    def scans(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "scan":
                yield eqn
            for sub in jax.core.jaxprs_in_params(eqn.params):
                yield from scans(sub)

    layer_scans = [e for e in scans(jaxpr.jaxpr)]
    assert [e.params["length"] for e in layer_scans] == [SELECTED[-1] + 1]
    # The scanned layer weights are sliced to the layers that run.
    q_kernel_shapes = [v.aval.shape for v in layer_scans[0].invars if v.aval.shape[1:] == (64, 4, 16)]
    assert q_kernel_shapes == [(SELECTED[-1] + 1, 64, 4, 16)]
    # And the weights of later layers do not matter.
    before = np.asarray(_encode(enc, ids, mask))
    layers = enc.layers
    layers.gate_up_proj.set_value(layers.gate_up_proj.get_value().at[SELECTED[-1] + 1 :].set(jnp.nan))
    layers.q_proj.kernel.set_value(layers.q_proj.kernel.get_value().at[SELECTED[-1] + 1 :].set(jnp.nan))
    np.testing.assert_array_equal(np.asarray(_encode(enc, ids, mask)), before)


def test_yarn_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cases = [
        TINY_HF["rope_parameters"],
        {**TINY_HF["rope_parameters"], "truncate": True},
        dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
             truncate=False, original_max_position_embeddings=4096),
    ]
    for rope in cases:
        hf_cfg = _hf_config(rope_parameters=dict(rope), head_dim=64)
        inv_ref, scale_ref = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
        cfg = GptOssConfig.from_hf_config(hf_cfg.to_dict(), selected_layers=SELECTED)
        inv, scale = yarn_inv_freq(cfg)
        np.testing.assert_allclose(inv, inv_ref.numpy(), rtol=1e-6)
        assert scale == pytest.approx(scale_ref)
    # Plain RoPE is YaRN with factor 1.
    default = _hf_config(rope_parameters=dict(rope_type="default", rope_theta=100.0), head_dim=64)
    cfg = GptOssConfig.from_hf_config(default.to_dict(), selected_layers=SELECTED)
    inv, scale = yarn_inv_freq(cfg)
    np.testing.assert_allclose(inv, 1.0 / 100.0 ** (np.arange(0, 64, 2) / 64), rtol=1e-6)
    assert scale == 1.0


def test_from_hf_config_old_and_new_rope_fields():
    hub = {  # the hub's config.json (old rope fields), trimmed to what matters
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
        "head_dim": 64, "hidden_size": 2880, "intermediate_size": 2880, "num_attention_heads": 64,
        "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
        "experts_per_token": 4, "num_experts_per_tok": 4, "vocab_size": 201088, "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(24)],
    }
    assert GptOssConfig.from_hf_config(hub) == GptOssConfig.gpt_oss_20b()
    new = transformers.GptOssConfig(**{k: v for k, v in hub.items() if k not in ("rope_scaling", "rope_theta", "architectures", "experts_per_token", "model_type")},
                                    rope_parameters={**hub["rope_scaling"], "rope_theta": 150000.0})
    assert GptOssConfig.from_hf_config(new.to_dict()) == GptOssConfig.gpt_oss_20b()
    assert GptOssConfig.from_hf_config(new) == GptOssConfig.gpt_oss_20b()
    with pytest.raises(ValueError, match="layer_types"):
        GptOssConfig.from_hf_config({**hub, "layer_types": ["full_attention"] * 24})


def test_config_dict_round_trip_and_unknown_keys():
    import ml_collections

    cfg = GptOssConfig.gpt_oss_20b(moe_impl="dense", dtype="float32")
    assert GptOssConfig.from_dict(cfg.to_dict()) == cfg
    assert GptOssConfig.from_dict(ml_collections.ConfigDict(cfg.to_dict())) == cfg
    with pytest.raises(ValueError, match="hidden_sizee"):
        GptOssConfig.from_dict({**cfg.to_dict(), "hidden_sizee": 8})
    with pytest.raises(ValueError, match="moe_impl"):
        GptOssConfig.from_dict({"moe_impl": "sparse"})
    with pytest.raises(ValueError, match="selected_layers"):
        GptOssConfig.from_dict({"selected_layers": [5, 24]})


def _abstract_param_count(cfg, include_lm_head):
    enc = nnx.eval_shape(lambda: GptOssEncoder(cfg, rngs=nnx.Rngs(0), include_lm_head=include_lm_head))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(enc, nnx.Param)))


def test_param_count_tiny(hf_model):
    cfg = GptOssConfig.from_hf_config(hf_model.config.to_dict(), selected_layers=SELECTED)
    n_torch = sum(p.numel() for p in hf_model.parameters())
    assert gpt_oss_param_count(cfg, include_lm_head=True) == n_torch
    assert gpt_oss_param_count(cfg) == _abstract_param_count(cfg, include_lm_head=False)
    enc = GptOssEncoder(cfg, rngs=nnx.Rngs(0), include_lm_head=True)  # a real random init
    params = jax.tree.leaves(nnx.state(enc, nnx.Param))
    assert gpt_oss_param_count(cfg, include_lm_head=True) == sum(x.size for x in params)
    assert all(np.isfinite(np.asarray(x)).all() for x in params)


def test_param_count_20b():
    V, D, L, H, K, d, E, I = 201088, 2880, 24, 64, 8, 64, 32, 2880
    attn = (D * H * d + H * d) + 2 * (D * K * d + K * d) + (H * d * D + D) + H
    assert attn == 11_800_576 + 2 * 1_475_072 + 11_799_360 + 64 == 26_550_144
    router = E * D + E  # 92_192
    experts = E * D * 2 * I + E * 2 * I + E * I * D + E * D  # 531_025_920 + 265_512_960
    assert experts == 796_538_880
    per_layer = attn + router + experts + 2 * D
    assert per_layer == 823_186_976
    embed = V * D  # 579_133_440
    no_head = embed + L * per_layer + D
    assert no_head == 20_335_623_744
    assert no_head + V * D == 20_914_757_184  # the published "21B" total (untied lm_head)

    cfg = GptOssConfig.gpt_oss_20b()
    assert gpt_oss_param_count(cfg) == no_head
    assert gpt_oss_param_count(cfg, include_lm_head=True) == no_head + V * D
    enc = nnx.eval_shape(lambda: GptOssEncoder(cfg, rngs=nnx.Rngs(0), include_lm_head=True))
    params = nnx.to_flat_state(nnx.state(enc, nnx.Param))
    assert sum(int(np.prod(v.get_value().shape)) for _, v in params) == no_head + V * D
    # Every parameter names its axes with names the sharding rules know.
    for path, v in params:
        axes = v.get_metadata()["out_sharding"]
        assert len(axes) == len(v.get_value().shape), path
        logical_to_spec(axes)  # raises on an unknown logical name
    # The full-size forward traces (abstractly) to the documented feature shape.
    graphdef, state = nnx.split(enc)
    out = jax.eval_shape(
        lambda st, i, m: nnx.merge(graphdef, st)(i, m),
        state, jax.ShapeDtypeStruct((2, 16), jnp.int32), jax.ShapeDtypeStruct((2, 16), bool),
    )
    assert out.shape == (2, 16, 4, 2880) and out.dtype == jnp.bfloat16


def test_bfloat16_runs(hf_model, batch):
    ids, mask = map(jnp.asarray, batch)
    f32 = _encoder(hf_model, moe_impl="ragged")
    bf16 = nnx.eval_shape(lambda: GptOssEncoder(dataclasses.replace(f32.cfg, dtype="bfloat16"), rngs=nnx.Rngs(0)))
    nnx.update(bf16, nnx.state(f32, nnx.Param))
    out = _encode(bf16, ids, mask)
    assert out.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out, np.float32)).all()
    assert nnx.state(bf16, nnx.Param)["layers"]["q_proj"]["kernel"].get_value().dtype == jnp.float32


def test_sparse_moe_paths_match_dense_under_skewed_routing():
    from lens_jax.models.gpt_oss import moe_blocked, moe_dense, moe_ragged

    rng = np.random.default_rng(0)
    N, k, D, E, I = 37, 3, 8, 6, 5
    # Skewed routing: most tokens pick experts 0 and 1, expert 5 is never used.
    first = np.where(rng.random(N) < 0.8, 0, rng.integers(0, 5, N))
    idx = np.stack([first, (first + 1) % 5, (first + 2 + rng.integers(0, 2, N)) % 5], axis=1)
    assert all(len(set(r)) == k for r in idx)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    w = jax.nn.softmax(f(N, k), axis=-1)
    args = (f(N, D), jnp.asarray(idx, jnp.int32), w, f(E, D, 2 * I), f(E, 2 * I), f(E, I, D), f(E, D))
    act = dict(limit=1.5, alpha=1.702)
    ref = np.asarray(jax.jit(lambda *a: moe_dense(*a, **act))(*args))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda *a: moe_ragged(*a, **act))(*args)), ref, atol=1e-5)
    blocked = jax.jit(lambda *a, bs: moe_blocked(*a, **act, block_size=bs), static_argnames="bs")
    for bs in (0, 1, 3, 8, 64):
        np.testing.assert_allclose(np.asarray(blocked(*args, bs=bs)), ref, atol=1e-5, err_msg=str(bs))
