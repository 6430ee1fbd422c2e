"""Lens DiT (lens_jax.models.dit) against an independent PyTorch reference (tests/reference), SPEC section 1.

The reference has exactly the official state-dict keys; `torch_state_dict_to_nnx` below copies a
state dict into the NNX model following the parameter-path table of lens_jax/models/dit.py's docstring
(the real checkpoint converter is separate).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from lens_jax.models.dit import DiTConfig, LensDiT, dit_param_count  # noqa: E402
from lens_jax.models.rope import joint_positions  # noqa: E402
from tests.reference.lens_dit_torch import (  # noqa: E402
    LensDiTTorch,
    official_config,
    reference_positions,
)
from tests.reference.lens_dit_torch import timestep_sinusoid as reference_sinusoid  # noqa: E402

OFFICIAL_PARAMS = 4_104_225_152
OFFICIAL_KEYS = 1264

# Tiny shape: 2 blocks, 2 heads x 16 (inner 32, SwiGLU hidden int(32*8/3) = 85), 3 text layers of
# width 24, unequal RoPE axes (2, 6, 8) so that a wrong axis order cannot cancel out.
TINY = dict(
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=12,
    enc_hidden_dim=24,
    axes_dims_rope=(2, 6, 8),
    num_text_layers=3,
)


def tiny_torch_config(**over) -> dict:
    c = dict(
        patch_size=2,
        in_channels=TINY["in_channels"],
        out_channels=3,  # nominal, as in the official config (the real width is in_channels)
        num_layers=TINY["num_layers"],
        attention_head_dim=TINY["attention_head_dim"],
        num_attention_heads=TINY["num_attention_heads"],
        enc_hidden_dim=TINY["enc_hidden_dim"],
        axes_dims_rope=list(TINY["axes_dims_rope"]),
        selected_layer_index=list(range(TINY["num_text_layers"])),
    )
    c.update(over)
    return c


def tiny_jax_config(out_channels=None, **over) -> DiTConfig:
    kw = dict(TINY)
    kw.update(over)
    kw["out_channels"] = kw["in_channels"] if out_channels is None else out_channels
    return DiTConfig(**kw, dtype="float32", init="fan_in")


# ----------------------------------------------------------------------------------------------
# official torch keys -> NNX paths (dit.py docstring table)


def _key_plan(key: str, cfg: DiTConfig):
    """(nnx path candidates, layer index or None, stack index or None, transform) for one torch key."""
    H, Dh = cfg.num_attention_heads, cfg.attention_head_dim
    d = H * Dh
    L, D = cfg.num_text_layers, cfg.enc_hidden_dim
    T = lambda w: w.T  # noqa: E731
    ident = lambda w: w  # noqa: E731

    def linear(prefix, name):
        kind = name.rsplit(".", 1)[1]
        return [prefix + ("kernel" if kind == "weight" else "bias",)], (T if kind == "weight" else ident)

    parts = key.split(".")
    if parts[0] == "transformer_blocks":
        layer = int(parts[1])
        rest = ".".join(parts[2:])
        simple_linear = {
            "img_mod.1": ("img_mod",),
            "txt_mod.1": ("txt_mod",),
        }
        for tk, p in simple_linear.items():
            if rest.startswith(tk + "."):
                paths, fn = linear(("blocks",) + p, rest)
                return paths, layer, None, fn
        for s in ("img", "txt"):
            for n in ("1", "2"):
                if rest == f"{s}_norm{n}.weight":
                    return [("blocks", f"{s}_norm{n}", "weight")], layer, None, ident
            for wn in ("w1", "w2", "w3"):
                if rest == f"{s}_mlp.{wn}.weight":
                    return [("blocks", f"{s}_mlp", wn, "kernel")], layer, None, T
        for qn in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            if rest == f"attn.{qn}.weight":
                return [("blocks", qn, "weight")], layer, None, ident
        for s in ("img", "txt"):
            if rest == f"attn.{s}_qkv.weight":
                return [("blocks", f"{s}_qkv", "kernel")], layer, None, lambda w: w.T.reshape(d, 3, H, Dh)
            if rest == f"attn.{s}_qkv.bias":
                return [("blocks", f"{s}_qkv", "bias")], layer, None, lambda b: b.reshape(3, H, Dh)
        for tk, s in (("attn.to_out.0", "img"), ("attn.to_add_out", "txt")):
            if rest == tk + ".weight":
                return [("blocks", f"{s}_out", "kernel")], layer, None, lambda w: w.T.reshape(H, Dh, d)
            if rest == tk + ".bias":
                return [("blocks", f"{s}_out", "bias")], layer, None, ident
        raise KeyError(key)
    if parts[0] == "txt_norm":
        # the docstring says `txt_norm.weight [L, D]`; accept a bare `txt_norm` Param too
        return [("txt_norm", "weight"), ("txt_norm",)], None, int(parts[1]), ident
    if key == "txt_in.weight":
        return [("txt_in", "kernel")], None, None, lambda w: w.T.reshape(L, D, d)
    top = {
        "time_text_embed.timestep_embedder.linear_1": ("time_linear_1",),
        "time_text_embed.timestep_embedder.linear_2": ("time_linear_2",),
        "txt_in": ("txt_in",),
        "img_in": ("img_in",),
        "norm_out.linear": ("norm_out_linear",),
        "proj_out": ("proj_out",),
    }
    prefix, name = key.rsplit(".", 1)
    if prefix in top:
        paths, fn = linear(top[prefix], key)
        return paths, None, None, fn
    raise KeyError(key)


def _resolve(paths, flat):
    for p in paths:
        if p in flat:
            return p
    raise KeyError(f"none of {paths} in the NNX state")


def _slot(target_shape, layer, stack):
    """Index into the target array and the expected per-slot shape."""
    if layer is not None:
        return (layer,), tuple(target_shape[1:])
    if stack is not None:
        return (stack,), tuple(target_shape[1:])
    return (), tuple(target_shape)


def check_key_plan(shapes: dict, cfg: DiTConfig, flat_shapes: dict) -> None:
    """Every official key maps to a slot of the right shape and every NNX param is fully covered."""
    filled = {p: 0 for p in flat_shapes}
    for key, shape in shapes.items():
        paths, layer, stack, fn = _key_plan(key, cfg)
        p = _resolve(paths, flat_shapes)
        _, want = _slot(flat_shapes[p], layer, stack)
        got = fn(np.broadcast_to(np.zeros((), np.float32), shape)).shape
        assert tuple(got) == want, (key, got, want)
        filled[p] += int(np.prod(got))
    for p, n in filled.items():
        assert n == int(np.prod(flat_shapes[p])), (p, n, flat_shapes[p])


def torch_state_dict_to_nnx(model: LensDiT, sd: dict) -> None:
    """Copy an official-key torch state dict into `model` (in place, via nnx.update).

    Every NNX parameter must be written (checked), so `model` may be an `nnx.eval_shape` one.
    """
    cfg = model.cfg if hasattr(model, "cfg") else None
    assert cfg is not None, "LensDiT should keep its config as .cfg"
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    flat_shapes = {p: tuple(np.shape(v.get_value())) for p, v in flat.items()}
    check_key_plan({k: tuple(v.shape) for k, v in sd.items()}, cfg, flat_shapes)
    new = {p: np.full(s, np.nan, np.float32) for p, s in flat_shapes.items()}
    for key, t in sd.items():
        paths, layer, stack, fn = _key_plan(key, cfg)
        p = _resolve(paths, flat)
        idx, want = _slot(flat_shapes[p], layer, stack)
        arr = fn(t.detach().cpu().to(torch.float32).numpy())
        assert arr.shape == want
        new[p][idx] = arr
    out = []
    for p, v in flat.items():
        assert not np.isnan(new[p]).any(), f"{p} not fully written"
        out.append((p, v.replace(jnp.asarray(new[p], dtype=v.get_value().dtype))))
    nnx.update(model, nnx.from_flat_state(out))


# ----------------------------------------------------------------------------------------------
# fixtures


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random non-trivial values everywhere: norm weights in [0.5, 1.5], biases non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # RMSNorm weights
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1]
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))


def make_pair(seed=0, out_channels=None):
    ref = LensDiTTorch(tiny_torch_config(), proj_out_channels=out_channels).to(torch.float32)
    randomize_(ref, seed)
    ref.eval()
    # every parameter is overwritten (the converter checks full coverage), so build the model
    # abstractly (LensDiT holds no state besides nnx.Param) instead of paying for a real init
    cfg = tiny_jax_config(out_channels=out_channels)
    model = nnx.eval_shape(lambda: LensDiT(cfg, rngs=nnx.Rngs(seed + 100)))
    assert not jax.tree_util.tree_leaves(nnx.state(model, nnx.Not(nnx.Param)))
    torch_state_dict_to_nnx(model, ref.state_dict())
    return ref, model


def make_inputs(B, h, w, T, valid_lens, sigma, seed=0, C=TINY["in_channels"]):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, h, w, C)).astype(np.float32)
    th = (3.0 * rng.standard_normal((B, T, TINY["num_text_layers"], TINY["enc_hidden_dim"]))).astype(np.float32)
    mask = np.zeros((B, T), bool)
    for b, n in enumerate(valid_lens):
        mask[b, :n] = True
    return x, np.asarray(sigma, np.float32), th, mask


def run_ref(ref, x, sigma, th, mask):
    with torch.no_grad():
        return ref(torch.from_numpy(x), torch.from_numpy(sigma), torch.from_numpy(th), torch.from_numpy(mask)).numpy()


@nnx.jit
def _jax_forward(model, x, sigma, th, mask):
    return model(x, sigma, th, mask)


def run_jax(model, x, sigma, th, mask):
    return np.asarray(_jax_forward(model, jnp.asarray(x), jnp.asarray(sigma), jnp.asarray(th), jnp.asarray(mask)))


@pytest.fixture(scope="module")
def pair():
    return make_pair(seed=0)


# ----------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("hw", [(3, 5), (4, 2)])
@pytest.mark.parametrize("sigma", [(0.0, 0.137, 0.61), (1.0, 0.5, 0.02)])
def test_parity_float32(pair, hw, sigma):
    ref, model = pair
    h, w = hw
    # row 0: all 6 text tokens; row 1: padded (3 valid, trailing False); row 2: 1 valid
    x, s, th, mask = make_inputs(3, h, w, 6, [6, 3, 1], sigma, seed=h * 10 + w)
    want = run_ref(ref, x, s, th, mask)
    got = run_jax(model, x, s, th, mask)
    assert got.shape == (3, h, w, TINY["in_channels"]) == want.shape
    err = float(np.max(np.abs(got - want)))
    # float64 reference, to report which side is nearer the exact value
    ref64 = LensDiTTorch(tiny_torch_config()).to(torch.float64)
    ref64.load_state_dict({k: v.to(torch.float64) for k, v in ref.state_dict().items()})
    with torch.no_grad():
        exact = ref64(*(torch.from_numpy(a.astype(np.float64) if a.dtype != bool else a) for a in (x, s, th, mask))).numpy()
    print(
        f"\nparity h={h} w={w} sigma={sigma}: max|jax-torch32|={err:.3e} "
        f"max|jax-torch64|={np.max(np.abs(got - exact)):.3e} max|torch32-torch64|={np.max(np.abs(want - exact)):.3e} "
        f"max|v|={np.max(np.abs(want)):.2f}"
    )
    assert np.isfinite(got).all()
    assert err < 1e-4


def test_parity_proj_out_width():
    """proj_out width other than in_channels (tiny-test override) is honoured by both sides."""
    ref, model = make_pair(seed=3, out_channels=5)
    x, s, th, mask = make_inputs(2, 2, 3, 4, [4, 2], (0.3, 0.9), seed=7)
    want = run_ref(ref, x, s, th, mask)
    got = run_jax(model, x, s, th, mask)
    assert got.shape == want.shape == (2, 2, 3, 5)
    err = float(np.max(np.abs(got - want)))
    print(f"\nparity out_channels=5: max abs err {err:.3e}")
    assert err < 1e-4


def test_parity_small_magnitudes_exercise_eps():
    """Tiny text features and q/k make the RMSNorm eps values (1e-5 text, 1e-6 QK) matter."""
    ref = LensDiTTorch(tiny_torch_config()).to(torch.float32)
    randomize_(ref, 21)
    with torch.no_grad():
        for blk in ref.transformer_blocks:
            for lin in (blk.attn.img_qkv, blk.attn.txt_qkv):
                lin.weight.mul_(2e-3)
                lin.bias.mul_(2e-3)
    cfg = tiny_jax_config()
    model = nnx.eval_shape(lambda: LensDiT(cfg, rngs=nnx.Rngs(0)))
    torch_state_dict_to_nnx(model, ref.state_dict())
    x, s, th, mask = make_inputs(2, 3, 4, 5, [5, 3], (0.7, 0.2), seed=4)
    th = (th * 1e-3).astype(np.float32)
    want = run_ref(ref, x, s, th, mask)
    got = run_jax(model, x, s, th, mask)
    err = float(np.max(np.abs(got - want)))
    print(f"\nparity small magnitudes: max abs err {err:.3e}")
    assert err < 1e-4


def test_timestep_sinusoid_argument_order():
    """[cos, sin] of (sigma * freq) * 1000, sigma cast first (SPEC: the order matters at ~2e-5).

    XLA's float32 exp can differ from torch's by 1 ulp, which the x1000 turns into ~3e-5, so the
    frequencies are taken from jnp.exp here and only the argument order is checked.
    """
    from lens_jax.models.dit import timestep_embedding

    sig = np.array([0.0, 0.02, 0.137, 0.5, 0.61, 0.999, 1.0], np.float32)
    freqs = np.asarray(jnp.exp((-np.log(10000.0) * jnp.arange(128, dtype=jnp.float32)) / 128))
    arg = (sig[:, None] * freqs[None, :]) * np.float32(1000.0)
    alt = sig[:, None] * (freqs[None, :] * np.float32(1000.0))
    assert arg.dtype == alt.dtype == np.float32
    want = np.concatenate([np.cos(arg.astype(np.float64)), np.sin(arg.astype(np.float64))], -1)
    wrong = np.concatenate([np.cos(alt.astype(np.float64)), np.sin(alt.astype(np.float64))], -1)
    got = np.asarray(timestep_embedding(jnp.asarray(sig), 256, jnp.float32), np.float64)
    assert got.shape == (7, 256)
    err, err_wrong = np.max(np.abs(got - want)), np.max(np.abs(got - wrong))
    print(f"\nsinusoid: max err vs (sigma*f)*1000 {err:.2e}, vs sigma*(f*1000) {err_wrong:.2e}")
    assert err < 1e-6 < err_wrong
    # and the torch reference agrees up to the exp ulp noise
    ref = reference_sinusoid(torch.from_numpy(sig)).numpy()
    assert np.max(np.abs(ref - want)) < 1e-4


# ----------------------------------------------------------------------------------------------
# masking


def test_fully_masked_text_equals_no_text(pair):
    ref, model = pair
    x, s, th, mask = make_inputs(2, 3, 5, 5, [0, 0], (0.25, 0.8), seed=11)
    assert not mask.any()
    masked = run_jax(model, x, s, th, mask)
    empty = run_jax(model, x, s, th[:, :0], mask[:, :0])
    err = float(np.max(np.abs(masked - empty)))
    print(f"\nfully masked vs no text (jax): max abs diff {err:.3e}")
    assert err <= 1e-6
    # and both agree with the reference's no-text output
    ref_empty = run_ref(ref, x, s, th[:, :0], mask[:, :0])
    assert np.max(np.abs(empty - ref_empty)) < 1e-4


def test_padding_invariance(pair):
    _, model = pair
    x, s, th, mask = make_inputs(3, 4, 2, 6, [6, 2, 4], (0.4, 0.4, 0.9), seed=5)
    base = run_jax(model, x, s, th, mask)
    th2 = th.copy()
    rng = np.random.default_rng(99)
    pad = ~mask
    th2[pad] = (100.0 * rng.standard_normal(th2[pad].shape)).astype(np.float32)
    changed = run_jax(model, x, s, th2, mask)
    # additive -inf on padded keys: the padded features have no influence at all
    np.testing.assert_array_equal(changed, base)
    # sanity: changing a VALID token does change that row's output (and only that row's)
    th3 = th.copy()
    th3[1, 0] += 1.0
    moved = run_jax(model, x, s, th3, mask)
    assert np.max(np.abs(moved[1] - base[1])) > 1e-4
    np.testing.assert_array_equal(moved[[0, 2]], base[[0, 2]])


# ----------------------------------------------------------------------------------------------
# parameter count and keys


def _nnx_param_count(state) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(state))


def test_official_param_count_analytic_and_abstract():
    cfg = DiTConfig()
    assert dit_param_count(cfg) == OFFICIAL_PARAMS
    abstract = nnx.eval_shape(lambda: LensDiT(cfg, rngs=nnx.Rngs(0)))
    assert _nnx_param_count(nnx.state(abstract, nnx.Param)) == OFFICIAL_PARAMS


def test_official_keys_meta_reference_and_mapping():
    with torch.device("meta"):
        ref = LensDiTTorch(official_config())
    sd = ref.state_dict()
    assert len(sd) == OFFICIAL_KEYS == 26 * 48 + 16
    assert sum(p.numel() for p in ref.parameters()) == OFFICIAL_PARAMS
    per_block = [k for k in sd if k.startswith("transformer_blocks.0.")]
    assert len(per_block) == 26
    assert len([k for k in sd if not k.startswith("transformer_blocks.")]) == 16
    assert sum(sd[k].numel() for k in per_block) == 84_971_776
    assert ref.proj_out.weight.shape == (128, 1536)  # real width = in_channels, not the nominal 32
    # every official key maps onto the (abstract) NNX model with the right shape, covering it fully
    cfg = DiTConfig()
    abstract = nnx.eval_shape(lambda: LensDiT(cfg, rngs=nnx.Rngs(0)))
    flat_shapes = {p: tuple(np.shape(v.get_value())) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    check_key_plan({k: tuple(v.shape) for k, v in sd.items()}, cfg, flat_shapes)


def test_tiny_param_count_matches_reference():
    ref = LensDiTTorch(tiny_torch_config())
    cfg = tiny_jax_config()
    model = nnx.eval_shape(lambda: LensDiT(cfg, rngs=nnx.Rngs(0)))
    n_jax = _nnx_param_count(nnx.state(model, nnx.Param))
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_jax == n_ref == dit_param_count(cfg)
    assert len(ref.state_dict()) == 26 * TINY["num_layers"] + 12 + TINY["num_text_layers"]


# ----------------------------------------------------------------------------------------------
# RoPE positions


@pytest.mark.parametrize("h,w,t", [(5, 5, 0), (5, 3, 2), (3, 5, 4), (4, 2, 3), (1, 7, 1), (6, 6, 5)])
def test_rope_positions(h, w, t):
    got = np.asarray(joint_positions(h, w, t))
    want = reference_positions(h, w, t).numpy()
    assert got.shape == want.shape == (h * w + t, 3)
    np.testing.assert_array_equal(got, want)


def test_rope_positions_examples():
    p = reference_positions(5, 4, 2).numpy()
    assert sorted(set(p[:20, 1].tolist())) == [-3, -2, -1, 0, 1]  # h = 5 gives rows -3..1
    assert sorted(set(p[:20, 2].tolist())) == [-2, -1, 0, 1]
    assert (p[:20, 0] == 0).all()
    np.testing.assert_array_equal(p[20:], [[2, 2, 2], [3, 3, 3]])  # max(5//2, 4//2) + t
    np.testing.assert_array_equal(np.asarray(joint_positions(5, 4, 2)), p)
