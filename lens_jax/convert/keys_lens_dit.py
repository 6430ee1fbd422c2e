"""Official Lens DiT keys <-> NNX paths of lens_jax.models.dit.LensDiT (the table in its docstring).

  official key (torch, [out, in] Linear weights)       NNX path [slot]                  transform
  time_text_embed.timestep_embedder.linear_{1,2}.w/b   time_linear_{1,2}.kernel/bias    .T / -
  txt_norm.{i}.weight [D]                              txt_norm [i] (of [L, D])         -
  txt_in.weight [d, L*D], .bias                        txt_in.kernel [L, D, d], .bias   .T.reshape(L, D, d)
  img_in, norm_out.linear, proj_out .weight/.bias      img_in, norm_out_linear, proj_out .T / -
  transformer_blocks.{i}.                              blocks.* [i]
    attn.{img,txt}_qkv.weight [3*H*Dh, d], .bias       {img,txt}_qkv.kernel [d, 3, H, Dh], .bias [3, H, Dh]
    attn.to_out.0 / attn.to_add_out .weight [d, H*Dh]  {img,txt}_out.kernel [H, Dh, d], .bias
    attn.norm_{q,k,added_q,added_k}.weight             norm_{q,k,added_q,added_k}.weight
    {img,txt}_mod.1.weight/.bias                       {img,txt}_mod.kernel/.bias
    {img,txt}_norm{1,2}.weight                         {img,txt}_norm{1,2}.weight
    {img,txt}_mlp.w{1,2,3}.weight                      {img,txt}_mlp.w{1,2,3}.kernel

Config: the official `transformer/config.json` fields (patch_size, in_channels, out_channels,
num_layers, attention_head_dim, num_attention_heads, enc_hidden_dim, axes_dims_rope,
selected_layer_index). `out_channels` is nominal: when out_channels * patch_size^2 == in_channels
(the official 32 * 2 * 2 = 128) the real proj_out width is in_channels, otherwise it is
out_channels. Sizes the official config cannot express are written as extra fields, only when they
differ from the upstream constants: `mlp_hidden_dim` (default int(inner * 8 / 3)),
`proj_out_channels` (a width the nominal rule would misread), `rope_theta` (10000), `timestep_dim`
(256). The PyTorch reference (lens_jax/convert/reference/lens_dit_torch.py) reads the same fields.
"""

from __future__ import annotations

from typing import Any, Mapping

from lens_jax.convert.common import ConvertError, Entry, Target, linear_entry, plain_entry
from lens_jax.models.dit import DiTConfig

OFFICIAL_FIELDS = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                   "num_attention_heads", "enc_hidden_dim", "axes_dims_rope", "selected_layer_index")
REQUIRED_FIELDS = ("in_channels", "num_layers", "attention_head_dim", "num_attention_heads", "enc_hidden_dim",
                   "axes_dims_rope", "selected_layer_index")
DEFAULT_PATCH = 2
ROPE_THETA = 10000.0
TIMESTEP_DIM = 256


def proj_out_width(c: Mapping[str, Any]) -> int:
    """The real proj_out width a config.json describes (see the module docstring)."""
    in_ch = int(c["in_channels"])
    if c.get("proj_out_channels") is not None:
        return int(c["proj_out_channels"])
    out = c.get("out_channels")
    if out is None:
        return in_ch
    p = int(c.get("patch_size") or DEFAULT_PATCH)
    return in_ch if int(out) * p * p == in_ch else int(out)


def config_from_official(c: Mapping[str, Any], **overrides) -> DiTConfig:
    """DiTConfig from an official transformer/config.json (plus the optional extra fields)."""
    missing = [f for f in REQUIRED_FIELDS if c.get(f) is None]
    if missing:
        raise ConvertError(f"lens-dit config.json lacks field(s) {missing}")
    inner = int(c["num_attention_heads"]) * int(c["attention_head_dim"])
    mlp = int(c.get("mlp_hidden_dim") or 0)
    kw = dict(
        num_layers=int(c["num_layers"]),
        num_attention_heads=int(c["num_attention_heads"]),
        attention_head_dim=int(c["attention_head_dim"]),
        in_channels=int(c["in_channels"]),
        out_channels=proj_out_width(c),
        enc_hidden_dim=int(c["enc_hidden_dim"]),
        num_text_layers=len(c["selected_layer_index"]),
        axes_dims_rope=tuple(int(a) for a in c["axes_dims_rope"]),
        rope_theta=float(c.get("rope_theta") or ROPE_THETA),
        mlp_hidden_dim=0 if mlp in (0, int(inner * 8 / 3)) else mlp,
        timestep_dim=int(c.get("timestep_dim") or TIMESTEP_DIM),
        dtype="float32",
    )
    kw.update(overrides)
    try:
        return DiTConfig(**kw)
    except ValueError as e:
        raise ConvertError(f"lens-dit config.json: {e}") from None


def official_config(cfg: DiTConfig, base: Mapping[str, Any] | None = None,
                    selected_layer_index=None) -> dict:
    """config.json for `cfg`: `base` (an imported config.json) with the size fields rewritten."""
    out = dict(base or {})
    for extra in ("mlp_hidden_dim", "proj_out_channels", "rope_theta", "timestep_dim"):
        out.pop(extra, None)
    p = int(out.get("patch_size") or DEFAULT_PATCH)
    sel = selected_layer_index if selected_layer_index is not None else out.get("selected_layer_index")
    if sel is None or len(sel) != cfg.num_text_layers:
        sel = list(range(cfg.num_text_layers))
    nominal = cfg.out_channels // (p * p) if cfg.out_channels == cfg.in_channels and cfg.in_channels % (p * p) == 0 \
        else cfg.out_channels
    out.update(
        patch_size=p,
        in_channels=cfg.in_channels,
        out_channels=nominal,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        enc_hidden_dim=cfg.enc_hidden_dim,
        axes_dims_rope=[int(a) for a in cfg.axes_dims_rope],
        selected_layer_index=[int(i) for i in sel],
    )
    if proj_out_width(out) != cfg.out_channels:
        out["proj_out_channels"] = cfg.out_channels
    if cfg.mlp_dim != int(cfg.inner_dim * 8 / 3):
        out["mlp_hidden_dim"] = cfg.mlp_dim
    if float(cfg.rope_theta) != ROPE_THETA:
        out["rope_theta"] = float(cfg.rope_theta)
    if cfg.timestep_dim != TIMESTEP_DIM:
        out["timestep_dim"] = cfg.timestep_dim
    return out


def entries(cfg: DiTConfig) -> list[Entry]:
    """Every official key, in the order of the reference module's state_dict."""
    H, Dh, d = cfg.num_attention_heads, cfg.attention_head_dim, cfg.inner_dim
    L, D, m = cfg.num_text_layers, cfg.enc_hidden_dim, cfg.mlp_dim
    out: list[Entry] = []

    def lin(key, path, out_f, in_f, index=None, kernel_shape=None, bias=True, bias_shape=None):
        out.append(linear_entry(f"{key}.weight", (out_f, in_f), Target(path + ("kernel",), index),
                                kernel_shape or (in_f, out_f)))
        if bias:
            out.append(plain_entry(f"{key}.bias", (out_f,), Target(path + ("bias",), index), bias_shape))

    lin("time_text_embed.timestep_embedder.linear_1", ("time_linear_1",), d, cfg.timestep_dim)
    lin("time_text_embed.timestep_embedder.linear_2", ("time_linear_2",), d, d)
    for i in range(L):
        out.append(plain_entry(f"txt_norm.{i}.weight", (D,), Target(("txt_norm",), i)))
    lin("txt_in", ("txt_in",), d, L * D, kernel_shape=(L, D, d))
    lin("img_in", ("img_in",), d, cfg.in_channels)
    for i in range(cfg.num_layers):
        p = f"transformer_blocks.{i}."
        for s in ("img", "txt"):
            lin(p + f"attn.{s}_qkv", ("blocks", f"{s}_qkv"), 3 * H * Dh, d, i, (d, 3, H, Dh), bias_shape=(3, H, Dh))
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            out.append(plain_entry(p + f"attn.{n}.weight", (Dh,), Target(("blocks", n, "weight"), i)))
        lin(p + "attn.to_out.0", ("blocks", "img_out"), d, H * Dh, i, (H, Dh, d))
        lin(p + "attn.to_add_out", ("blocks", "txt_out"), d, H * Dh, i, (H, Dh, d))
        for s in ("img", "txt"):
            lin(p + f"{s}_mod.1", ("blocks", f"{s}_mod"), 6 * d, d, i)
        for s in ("img", "txt"):
            for n in ("1", "2"):
                out.append(plain_entry(p + f"{s}_norm{n}.weight", (d,), Target(("blocks", f"{s}_norm{n}", "weight"), i)))
        for s in ("img", "txt"):
            lin(p + f"{s}_mlp.w1", ("blocks", f"{s}_mlp", "w1"), m, d, i, bias=False)
            lin(p + f"{s}_mlp.w2", ("blocks", f"{s}_mlp", "w2"), d, m, i, bias=False)
            lin(p + f"{s}_mlp.w3", ("blocks", f"{s}_mlp", "w3"), m, d, i, bias=False)
    lin("norm_out.linear", ("norm_out_linear",), 2 * d, d)
    lin("proj_out", ("proj_out",), cfg.out_channels, d)
    return out
