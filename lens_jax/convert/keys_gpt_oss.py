"""GPT-OSS keys <-> NNX paths of lens_jax.models.gpt_oss.GptOssEncoder (the table in its docstring).

Two official namings of the same tensors (i = decoder layer, D hidden, H/K heads, d head_dim,
E experts, I intermediate, V vocab); NNX paths are under `layers.*` at slot [i]:

  transformers (`GptOssForCausalLM`)                 OpenAI `original/`                       NNX
  model.embed_tokens.weight [V, D]                   embedding.weight                         embed_tokens
  model.layers.i.input_layernorm.weight              block.i.attn.norm.scale                  input_layernorm.weight
  model.layers.i.self_attn.{q,k,v}_proj.weight/bias  block.i.attn.qkv.weight [(H+2K)d, D]     {q,k,v}_proj.kernel [D, H|K, d]
                                                       / .bias (rows q, then k, then v)          / .bias [H|K, d]
  model.layers.i.self_attn.o_proj.weight/bias        block.i.attn.out.weight/bias             o_proj.kernel [H, d, D] / .bias
  model.layers.i.self_attn.sinks [H]                 block.i.attn.sinks                       sinks
  model.layers.i.post_attention_layernorm.weight     block.i.mlp.norm.scale                   post_attention_layernorm.weight
  model.layers.i.mlp.router.weight [E, D] / bias     block.i.mlp.gate.weight / bias           router.kernel [D, E] / .bias
  model.layers.i.mlp.experts.gate_up_proj [E, D, 2I] block.i.mlp.mlp1_weight [E, 2I, D]       gate_up_proj [E, D, 2I]
  model.layers.i.mlp.experts.gate_up_proj_bias       block.i.mlp.mlp1_bias [E, 2I]            gate_up_proj_bias
  model.layers.i.mlp.experts.down_proj [E, I, D]     block.i.mlp.mlp2_weight [E, D, I]        down_proj [E, I, D]
  model.layers.i.mlp.experts.down_proj_bias          block.i.mlp.mlp2_bias [E, D]             down_proj_bias
  model.norm.weight                                  norm.scale                               norm.weight
  lm_head.weight [V, D]                              unembedding.weight                       lm_head.kernel [D, V]

MXFP4: the expert weights may instead be stored as blocks/scales pairs ([E, out, in/32, 16] uint8 and
[E, out, in/32] uint8): transformers `...experts.gate_up_proj_blocks` / `_scales` (of the transposed
logical tensor), original `block.i.mlp.mlp1_weight.blocks` / `.scales` (no transpose). Gate and up
stay interleaved (even / odd columns) in every layout.

Configs: transformers' config.json (read by GptOssConfig.from_hf_config) or OpenAI's
original/config.json (num_experts, experts_per_token, initial_context_length, rope_scaling_factor,
rope_ntk_alpha = beta_slow, rope_ntk_beta = beta_fast; YaRN without truncation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from lens_jax.convert import mxfp4
from lens_jax.convert.common import ConvertError, Entry, Target, linear_entry, plain_entry, transposed_entry
from lens_jax.models.gpt_oss import GptOssConfig

FORMATS = ("transformers", "original")
LENS_SELECTED = (5, 11, 17, 23)
_NON_HF_FIELDS = ("selected_layers", "dtype", "moe_impl", "moe_block_size")


def detect_format(keys) -> str:
    keys = list(keys)
    if any(k.startswith("block.") or k in ("embedding.weight", "unembedding.weight") for k in keys):
        return "original"
    if any(k.startswith("model.layers.") or k == "model.embed_tokens.weight" for k in keys):
        return "transformers"
    raise ConvertError(f"not a GPT-OSS checkpoint: no 'model.layers.*' (transformers) or 'block.*' (original) keys; "
                       f"first keys {sorted(keys)[:5]}")


def is_mxfp4(keys) -> bool:
    return any(k.endswith("_blocks") or k.endswith(".blocks") for k in keys)


def has_lm_head(keys, fmt: str) -> bool:
    return ("lm_head.weight" if fmt == "transformers" else "unembedding.weight") in set(keys)


def default_selected(num_layers: int) -> tuple[int, ...]:
    """Lens' layers 5, 11, 17, 23 when the model has them, else every layer."""
    return LENS_SELECTED if num_layers > LENS_SELECTED[-1] else tuple(range(num_layers))


def is_original_config(c: Mapping[str, Any]) -> bool:
    return "num_experts" in c and "rope_ntk_alpha" in c


def config_from_json(c: Mapping[str, Any], fmt: str | None = None, **overrides) -> GptOssConfig:
    """GptOssConfig from a transformers config.json or an OpenAI original/config.json."""
    fmt = fmt or ("original" if is_original_config(c) else "transformers")
    if fmt == "original":
        c = {
            "num_hidden_layers": c.get("num_hidden_layers", 36),
            "num_local_experts": c.get("num_experts", 128),
            "num_experts_per_tok": c.get("experts_per_token", 4),
            "vocab_size": c.get("vocab_size", 201088),
            "hidden_size": c.get("hidden_size", 2880),
            "intermediate_size": c.get("intermediate_size", 2880),
            "swiglu_limit": c.get("swiglu_limit", 7.0),
            "head_dim": c.get("head_dim", 64),
            "num_attention_heads": c.get("num_attention_heads", 64),
            "num_key_value_heads": c.get("num_key_value_heads", 8),
            "sliding_window": c.get("sliding_window", 128),
            "rope_theta": c.get("rope_theta", 150000.0),
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": float(c.get("rope_scaling_factor", 32.0)),
                "beta_fast": float(c.get("rope_ntk_beta", 32.0)),
                "beta_slow": float(c.get("rope_ntk_alpha", 1.0)),
                "truncate": False,
                "original_max_position_embeddings": int(c.get("initial_context_length", 4096)),
            },
        }
    n = int(c.get("num_hidden_layers") or 36)
    overrides.setdefault("selected_layers", default_selected(n))
    try:
        return GptOssConfig.from_hf_config(dict(c), **overrides)
    except ValueError as e:
        raise ConvertError(f"gpt-oss config.json: {e}") from None


def hf_config(cfg: GptOssConfig, base: Mapping[str, Any] | None = None, torch_dtype: str = "bfloat16",
              mxfp4_experts: bool = False) -> dict:
    """A transformers config.json for `cfg` (`base`: an imported one, kept where it agrees)."""
    out = dict(base or {})
    for k in ("rope_parameters", "rope_scaling", "quantization_config", "torch_dtype", "dtype"):
        out.pop(k, None)
    n = cfg.num_hidden_layers
    out.setdefault("architectures", ["GptOssForCausalLM"])
    out.setdefault("model_type", "gpt_oss")
    out.setdefault("attention_bias", True)
    out.setdefault("attention_dropout", 0.0)
    out.setdefault("hidden_act", "silu")
    out.setdefault("initializer_range", 0.02)
    out.setdefault("max_position_embeddings", 131072)
    out.setdefault("tie_word_embeddings", False)
    out.update(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=n,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        num_local_experts=cfg.num_local_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        intermediate_size=cfg.intermediate_size,
        sliding_window=cfg.sliding_window,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)],
        rms_norm_eps=cfg.rms_norm_eps,
        swiglu_limit=cfg.swiglu_limit,
        rope_theta=cfg.rope_theta,
        rope_scaling={
            "rope_type": "yarn",
            "factor": cfg.rope_factor,
            "beta_fast": cfg.rope_beta_fast,
            "beta_slow": cfg.rope_beta_slow,
            "truncate": cfg.rope_truncate,
            "original_max_position_embeddings": cfg.rope_original_max_position_embeddings,
        },
        torch_dtype=torch_dtype,
    )
    if cfg.swiglu_alpha != 1.702:
        out["swiglu_alpha"] = cfg.swiglu_alpha
    if mxfp4_experts:
        out["quantization_config"] = {
            "quant_method": "mxfp4",
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                       "model.embed_tokens", "lm_head"],
        }
    return out


def original_config(cfg: GptOssConfig, base: Mapping[str, Any] | None = None) -> dict:
    """OpenAI's original/config.json for `cfg`."""
    if cfg.rope_truncate:
        raise ConvertError("OpenAI's original layout has no YaRN truncation; this config sets rope_truncate")
    out = dict(base or {})
    out.update(
        num_hidden_layers=cfg.num_hidden_layers,
        num_experts=cfg.num_local_experts,
        experts_per_token=cfg.num_experts_per_tok,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        swiglu_limit=cfg.swiglu_limit,
        head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        sliding_window=cfg.sliding_window,
        initial_context_length=cfg.rope_original_max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rope_scaling_factor=cfg.rope_factor,
        rope_ntk_alpha=cfg.rope_beta_slow,
        rope_ntk_beta=cfg.rope_beta_fast,
    )
    return out


def model_fields(cfg: GptOssConfig) -> dict:
    """The shape/numerics fields of cfg (those a checkpoint fixes), without run-time choices."""
    d = dataclasses.asdict(cfg)
    for k in _NON_HF_FIELDS:
        d.pop(k, None)
    return d


# ----------------------------------------------------------------------------------------------
# tables


def entries(cfg: GptOssConfig, fmt: str, include_lm_head: bool) -> list[Entry]:
    if fmt == "transformers":
        return _transformers_entries(cfg, include_lm_head)
    if fmt == "original":
        return _original_entries(cfg, include_lm_head)
    raise ConvertError(f"unknown gpt-oss format {fmt!r}; expected one of {FORMATS}")


def mxfp4_pairs(cfg: GptOssConfig, fmt: str) -> dict[str, mxfp4.Pair]:
    """Logical expert-weight key -> its MXFP4 blocks/scales storage."""
    out = {}
    for i in range(cfg.num_hidden_layers):
        if fmt == "transformers":
            for name in ("gate_up_proj", "down_proj"):
                k = f"model.layers.{i}.mlp.experts.{name}"
                out[k] = mxfp4.Pair(k, k + "_blocks", k + "_scales", transpose=True)
        else:
            for name in ("mlp1_weight", "mlp2_weight"):
                k = f"block.{i}.mlp.{name}"
                out[k] = mxfp4.Pair(k, k + ".blocks", k + ".scales", transpose=False)
    return out


def _transformers_entries(cfg: GptOssConfig, include_lm_head: bool) -> list[Entry]:
    D, H, K, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, I, V = cfg.num_local_experts, cfg.intermediate_size, cfg.vocab_size
    out = [plain_entry("model.embed_tokens.weight", (V, D), Target(("embed_tokens",)))]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."

        def t(*path):
            return Target(("layers",) + path, i)

        for name, heads in (("q_proj", H), ("k_proj", K), ("v_proj", K)):
            out.append(linear_entry(p + f"self_attn.{name}.weight", (heads * d, D), t(name, "kernel"), (D, heads, d)))
            out.append(plain_entry(p + f"self_attn.{name}.bias", (heads * d,), t(name, "bias"), (heads, d)))
        out.append(linear_entry(p + "self_attn.o_proj.weight", (D, H * d), t("o_proj", "kernel"), (H, d, D)))
        out.append(plain_entry(p + "self_attn.o_proj.bias", (D,), t("o_proj", "bias")))
        out.append(plain_entry(p + "self_attn.sinks", (H,), t("sinks")))
        out.append(linear_entry(p + "mlp.router.weight", (E, D), t("router", "kernel"), (D, E)))
        out.append(plain_entry(p + "mlp.router.bias", (E,), t("router", "bias")))
        out.append(plain_entry(p + "mlp.experts.gate_up_proj", (E, D, 2 * I), t("gate_up_proj")))
        out.append(plain_entry(p + "mlp.experts.gate_up_proj_bias", (E, 2 * I), t("gate_up_proj_bias")))
        out.append(plain_entry(p + "mlp.experts.down_proj", (E, I, D), t("down_proj")))
        out.append(plain_entry(p + "mlp.experts.down_proj_bias", (E, D), t("down_proj_bias")))
        out.append(plain_entry(p + "input_layernorm.weight", (D,), t("input_layernorm", "weight")))
        out.append(plain_entry(p + "post_attention_layernorm.weight", (D,), t("post_attention_layernorm", "weight")))
    out.append(plain_entry("model.norm.weight", (D,), Target(("norm", "weight"))))
    if include_lm_head:
        out.append(linear_entry("lm_head.weight", (V, D), Target(("lm_head", "kernel")), (D, V)))
    return out


def _qkv_entry(key: str, i: int, D: int, H: int, K: int, d: int, bias: bool) -> Entry:
    leaf = "bias" if bias else "kernel"
    targets = tuple(Target(("layers", n, leaf), i) for n in ("q_proj", "k_proj", "v_proj"))
    rows = (H * d, K * d, K * d)
    cuts = np.cumsum(rows)[:-1]

    if bias:
        def to_nnx(a):
            q, k, v = np.split(a[0], cuts)
            return [q.reshape(H, d), k.reshape(K, d), v.reshape(K, d)]

        def from_nnx(a):
            return [np.concatenate([x.reshape(-1) for x in a])]

        shape = (sum(rows),)
    else:
        def to_nnx(a):
            q, k, v = np.split(a[0], cuts, axis=0)
            return [q.T.reshape(D, H, d), k.T.reshape(D, K, d), v.T.reshape(D, K, d)]

        def from_nnx(a):
            return [np.concatenate([x.reshape(D, -1).T for x in a], axis=0)]

        shape = (sum(rows), D)
    return Entry((key,), (shape,), targets, to_nnx, from_nnx)


def _original_entries(cfg: GptOssConfig, include_lm_head: bool) -> list[Entry]:
    D, H, K, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, I, V = cfg.num_local_experts, cfg.intermediate_size, cfg.vocab_size
    out = [plain_entry("embedding.weight", (V, D), Target(("embed_tokens",)))]
    for i in range(cfg.num_hidden_layers):
        p = f"block.{i}."

        def t(*path):
            return Target(("layers",) + path, i)

        out.append(plain_entry(p + "attn.norm.scale", (D,), t("input_layernorm", "weight")))
        out.append(_qkv_entry(p + "attn.qkv.weight", i, D, H, K, d, bias=False))
        out.append(_qkv_entry(p + "attn.qkv.bias", i, D, H, K, d, bias=True))
        out.append(plain_entry(p + "attn.sinks", (H,), t("sinks")))
        out.append(linear_entry(p + "attn.out.weight", (D, H * d), t("o_proj", "kernel"), (H, d, D)))
        out.append(plain_entry(p + "attn.out.bias", (D,), t("o_proj", "bias")))
        out.append(plain_entry(p + "mlp.norm.scale", (D,), t("post_attention_layernorm", "weight")))
        out.append(linear_entry(p + "mlp.gate.weight", (E, D), t("router", "kernel"), (D, E)))
        out.append(plain_entry(p + "mlp.gate.bias", (E,), t("router", "bias")))
        out.append(transposed_entry(p + "mlp.mlp1_weight", (E, 2 * I, D), t("gate_up_proj"), (0, 2, 1)))
        out.append(plain_entry(p + "mlp.mlp1_bias", (E, 2 * I), t("gate_up_proj_bias")))
        out.append(transposed_entry(p + "mlp.mlp2_weight", (E, D, I), t("down_proj"), (0, 2, 1)))
        out.append(plain_entry(p + "mlp.mlp2_bias", (E, D), t("down_proj_bias")))
    out.append(plain_entry("norm.scale", (D,), Target(("norm", "weight"))))
    if include_lm_head:
        out.append(linear_entry("unembedding.weight", (V, D), Target(("lm_head", "kernel")), (D, V)))
    return out
