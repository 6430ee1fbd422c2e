"""Analytic FLOPs of a Lens training step: the DiT (SPEC sections 1 and 7), the frozen GPT-OSS text
encoder (section 2) and the FLUX.2 VAE encoder (section 3), checked against XLA's own count.

Only matmul FLOPs are counted (dots and convolutions, 2 FLOPs per multiply-add); norms, softmax,
RoPE, activations and the optimizer are elementwise and left out, as MFU conventions do. Every count
is per sample (one image with its caption), for the shapes the programs actually compute: padded text
tokens are counted, since the model runs on them.

DiT (`dit_flops_breakdown`, `dit_forward_flops`): per-stream matmuls for every token of that stream
(image: fused QKV, attention output, SwiGLU, plus `img_in` and `proj_out`; text: the same per block
plus `txt_in` over num_text_layers * enc_hidden_dim inputs), the joint non-causal attention
4 * T^2 * d per block (T = image + text tokens, d = heads * head_dim: QK^T and PV), and the matmuls
that run once per sample (timestep embedder, the per-block modulations, the final adaLN). There is no
guidance or pooled-text embedder and no text-stream head. In the SPEC section 7 form: forward =
2 * (P_img * T_img + P_txt * T_txt + P_sample) + 4 * L * d * T^2. The last block's text-stream output
projection and MLP are counted although their result is never used: the blocks run as one lax.scan,
so XLA computes them (as the official implementation does); only a 1-block model lets XLA drop them.

Training (`dit_train_flops`): model FLOPs = 3 x forward (backward = 2 x forward; remat
recomputation not counted). This is what MFU uses (bench, train loop, SPEC section 7), and it stays
the default. The program XLA runs does slightly less: a matmul whose input is data (the packed
latents into `img_in`, the timestep sinusoid into `time_linear_1`) needs no input gradient, so its
backward is one matmul, not two. (`txt_in` does need it: its input is the frozen features times the
learned per-layer `txt_norm` weight.) `dit_train_flops(..., exact=True)` subtracts those two (one
forward's worth of each) and equals XLA's count of the compiled train step (tests/budget/
test_flops.py). The difference is 2 * in_channels * d per image token: 5% for the micro test model,
whose token width (192) is large next to d (32), 0.2-2% for the other small test shapes, and 0.004%
at the official 3.8B shape; MFU keeps the model-FLOPs convention.

Text encoder (`text_encoder_forward_flops`): GPT-OSS forward only up to its last selected layer, no
lm_head; q/k/v/o projections, router, and experts. `experts='active'` (default: model FLOPs) counts the
top-k experts of each token; `experts='computed'` counts what `cfg.moe_impl` executes: 'dense' runs
every expert on every token (plus the combine matmul), 'blocked' runs the padded per-expert row blocks
(depends on the batch), 'ragged' a grouped GEMM over the top-k rows (ragged='grouped': what TPU and
GPU with the cuDNN ragged-dot fusion run) or, where XLA expands ragged_dot (XLA:CPU, GPU without the
fusion), a dense matmul of every expert over all top-k rows (ragged='expanded', E times the work).
Attention: our implementation computes the full T x T scores for every layer and masks them
(causal, and the 128-token window on sliding layers), so the default `attention='dense'` counts
4 * T^2 * H * head_dim per layer, sliding layers included; `attention='visible'` counts only the
query/key pairs that are not masked (causal triangle, window band), what a windowed kernel would run.

VAE (`vae_encode_flops`): the FLUX.2 encoder up to the posterior mean as `lens_jax.models.flux2_vae`
computes it: every conv as 2 * k * k * Cin * Cout * Hout * Wout (conv_in, resnet convs, 1x1
shortcuts, stride-2 downsamplers, conv_out, quant_conv over all 2 * latent channels: the log-variance
half is computed too), the single-head mid-block attention (q/k/v/out projections and 4 * N^2 * C).
The pixel codec is a reshape: 0.

`train_sample_flops` puts them together for a run config; `xla_matmul_flops` counts the matmul FLOPs
of a compiled XLA program from its HLO (loops multiplied by their trip counts), for checking.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

from lens_jax.models.dit import DiTConfig

# ----------------------------------------------------------------------------------------------
# DiT
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MatmulParams:
    """Matmul weights a token of each stream touches, and those used once per sample."""

    image_token: int
    text_token: int
    per_sample: int


def dit_matmul_params(cfg: DiTConfig) -> MatmulParams:
    d, m, n = cfg.inner_dim, cfg.mlp_dim, cfg.num_layers
    stream_block = 3 * d * d + d * d + 3 * d * m  # fused qkv, output projection, SwiGLU
    return MatmulParams(
        image_token=n * stream_block + cfg.in_channels * d + d * cfg.out_channels,
        text_token=n * stream_block + cfg.num_text_layers * cfg.enc_hidden_dim * d,
        per_sample=cfg.timestep_dim * d + d * d + n * 2 * d * 6 * d + d * 2 * d,
    )


def dit_flops_breakdown(cfg: DiTConfig, image_tokens: int, text_tokens: int) -> dict[str, float]:
    """Forward matmul FLOPs per sample, by part (names follow the NNX modules). Sums to
    `dit_forward_flops`."""
    d, m, n = cfg.inner_dim, cfg.mlp_dim, cfg.num_layers
    ti, tt = float(image_tokens), float(text_tokens)
    t = ti + tt
    return {
        "img_in": 2.0 * cfg.in_channels * d * ti,
        "txt_in": 2.0 * cfg.num_text_layers * cfg.enc_hidden_dim * d * tt,
        "time_linear_1": 2.0 * cfg.timestep_dim * d,
        "time_linear_2": 2.0 * d * d,
        "modulation": 2.0 * n * 2 * d * 6 * d,  # img_mod + txt_mod, once per sample per block
        "img_qkv": 2.0 * n * 3 * d * d * ti,
        "txt_qkv": 2.0 * n * 3 * d * d * tt,
        "attention_scores": 2.0 * n * d * t * t,  # Q K^T over the joint sequence, non-causal
        "attention_values": 2.0 * n * d * t * t,  # P V
        "img_out": 2.0 * n * d * d * ti,
        "txt_out": 2.0 * n * d * d * tt,
        "img_mlp": 2.0 * n * 3 * d * m * ti,
        "txt_mlp": 2.0 * n * 3 * d * m * tt,
        "norm_out_linear": 2.0 * d * 2 * d,
        "proj_out": 2.0 * d * cfg.out_channels * ti,
    }


# Forward matmuls whose input is data (the packed latents, the sigma sinusoid): their backward
# computes the weight gradient only. (`txt_in` is not one: its input is the frozen features times
# the learned `txt_norm` weight, whose gradient needs the input gradient of txt_in.)
_NO_INPUT_GRADIENT = ("img_in", "time_linear_1")


def dit_forward_flops(cfg: DiTConfig, image_tokens: int, text_tokens: int) -> float:
    """Forward matmul FLOPs per sample (SPEC section 7)."""
    return float(sum(dit_flops_breakdown(cfg, image_tokens, text_tokens).values()))


def dit_train_flops(cfg: DiTConfig, image_tokens: int, text_tokens: int, *, exact: bool = False) -> float:
    """Forward + backward FLOPs per sample.

    Default: model FLOPs, 3 x forward (backward = 2 x forward, remat not counted): what MFU uses.
    exact=True: what the train step computes, i.e. without the input-gradient matmuls of `img_in`
    and `time_linear_1`, whose inputs are data (see the module docstring)."""
    parts = dit_flops_breakdown(cfg, image_tokens, text_tokens)
    total = 3.0 * sum(parts.values())
    if exact:
        total -= sum(parts[k] for k in _NO_INPUT_GRADIENT)
    return total


# ----------------------------------------------------------------------------------------------
# GPT-OSS text encoder
# ----------------------------------------------------------------------------------------------


def moe_expert_rows(cfg, num_tokens: int, *, experts: str = "active", ragged: str = "grouped") -> int:
    """Rows of expert work (each row: one token through one expert's gate_up and down matmuls) for
    `num_tokens` tokens routed together (the encoder routes the whole batch, B * T tokens, at once).

    experts='active': tokens * top-k (model FLOPs). experts='computed': what `cfg.moe_impl` runs:
    'dense' every expert on every token; 'blocked' the per-expert blocks padded to the block size;
    'ragged' tokens * top-k for a grouped GEMM (ragged='grouped': TPU, GPU with the cuDNN ragged-dot
    fusion) or experts * tokens * top-k where XLA expands ragged_dot to a masked dense matmul over
    every expert (ragged='expanded': XLA:CPU, GPU without the fusion)."""
    n, k, e = int(num_tokens), cfg.num_experts_per_tok, cfg.num_local_experts
    if experts == "active":
        return n * k
    if experts != "computed":
        raise ValueError(f"experts={experts!r}; expected 'active' or 'computed'")
    if cfg.moe_impl == "dense":
        return n * e
    if cfg.moe_impl == "ragged":
        if ragged not in ("grouped", "expanded"):
            raise ValueError(f"ragged={ragged!r}; expected 'grouped' or 'expanded'")
        return n * k * (e if ragged == "expanded" else 1)
    if cfg.moe_impl == "blocked":
        from lens_jax.models.gpt_oss import _auto_block_size

        a = n * k
        bs = cfg.moe_block_size or _auto_block_size(a, e)
        return (a + e * (bs - 1)) // bs * bs
    raise ValueError(f"unknown moe_impl {cfg.moe_impl!r}")


def _visible_pairs(tokens: int, window: int | None) -> float:
    """Causal (query, key) pairs of a sequence, within `window` keys of the query if given."""
    t = int(tokens)
    if window is None or window >= t:
        return t * (t + 1) / 2.0
    return window * (window + 1) / 2.0 + (t - window) * float(window)


def text_encoder_flops_breakdown(cfg, tokens: int, *, experts: str = "active", attention: str = "dense",
                                 batch: int = 1, ragged: str = "grouped") -> dict[str, float]:
    """Forward matmul FLOPs of GptOssEncoder per sequence of `tokens` tokens, by part; only the
    layers up to the last selected one (cfg.num_layers_run), no lm_head. `batch` matters only for
    experts='computed' with moe_impl='blocked' (the padding of the row blocks depends on how many
    tokens are routed together); `ragged` only for experts='computed' with moe_impl='ragged' (see
    `moe_expert_rows`)."""
    if attention not in ("dense", "visible"):
        raise ValueError(f"attention={attention!r}; expected 'dense' or 'visible'")
    D, H, K, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, I = cfg.num_local_experts, cfg.intermediate_size
    layers = cfg.num_layers_run
    t = float(tokens)
    if attention == "dense":
        pairs = layers * t * t
    else:
        pairs = sum(_visible_pairs(tokens, cfg.sliding_window if i % 2 == 0 else None) for i in range(layers))
    rows = moe_expert_rows(cfg, int(tokens) * int(batch), experts=experts, ragged=ragged) / float(batch)
    out = {
        "q_proj": 2.0 * layers * D * H * hd * t,
        "k_proj": 2.0 * layers * D * K * hd * t,
        "v_proj": 2.0 * layers * D * K * hd * t,
        "attention_scores": 2.0 * H * hd * pairs,
        "attention_values": 2.0 * H * hd * pairs,
        "o_proj": 2.0 * layers * H * hd * D * t,
        "router": 2.0 * layers * D * E * t,
        "experts_gate_up": 2.0 * layers * D * 2 * I * rows,
        "experts_down": 2.0 * layers * I * D * rows,
    }
    if experts == "computed" and cfg.moe_impl == "dense":
        out["experts_combine"] = 2.0 * layers * E * D * t  # einsum over the [N, E] router weights
    return out


def text_encoder_forward_flops(cfg, tokens: int, *, experts: str = "active", attention: str = "dense",
                               batch: int = 1, ragged: str = "grouped") -> float:
    """GPT-OSS forward matmul FLOPs per sequence of `tokens` tokens (see the module docstring):
    up to the last selected layer, active (top-k) experts, router, dense T x T attention, no lm_head."""
    return float(sum(text_encoder_flops_breakdown(cfg, tokens, experts=experts, attention=attention,
                                                  batch=batch, ragged=ragged).values()))


# ----------------------------------------------------------------------------------------------
# FLUX.2 VAE encoder and codecs
# ----------------------------------------------------------------------------------------------


def _conv(k: int, cin: int, cout: int, h: int, w: int) -> float:
    return 2.0 * k * k * cin * cout * h * w


def vae_encode_flops_breakdown(vae_cfg, height: int, width: int) -> dict[str, float]:
    """Matmul FLOPs of Flux2VAE.encode on one height x width image, by part."""
    boc = tuple(vae_cfg.block_out_channels)
    h, w = int(height), int(width)
    out = {"conv_in": _conv(3, vae_cfg.in_channels, boc[0], h, w)}
    resnets = shortcuts = down = 0.0
    for i, c_out in enumerate(boc):
        c_in = boc[max(i - 1, 0)]
        for j in range(vae_cfg.layers_per_block):
            cin = c_in if j == 0 else c_out
            resnets += _conv(3, cin, c_out, h, w) + _conv(3, c_out, c_out, h, w)
            if cin != c_out:
                shortcuts += _conv(1, cin, c_out, h, w)
        if i != len(boc) - 1:  # pad right/bottom by 1, 3x3 stride 2, no padding
            h, w = (h - 2) // 2 + 1, (w - 2) // 2 + 1
            down += _conv(3, c_out, c_out, h, w)
    c, n = boc[-1], float(h * w)
    out["down_resnets"] = resnets
    out["down_shortcuts"] = shortcuts
    out["downsamplers"] = down
    out["mid_resnets"] = 2 * 2 * _conv(3, c, c, h, w)
    if vae_cfg.mid_block_add_attention:
        out["mid_attention_projections"] = 4 * 2.0 * c * c * n  # to_q, to_k, to_v, to_out
        out["mid_attention"] = 4.0 * n * n * c  # single head, head_dim = C
    out["conv_out"] = _conv(3, c, 2 * vae_cfg.latent_channels, h, w)
    if vae_cfg.use_quant_conv:
        out["quant_conv"] = _conv(1, 2 * vae_cfg.latent_channels, 2 * vae_cfg.latent_channels, h, w)
    return out


def vae_encode_flops(vae_cfg, height: int, width: int) -> float:
    """Matmul FLOPs of the FLUX.2 VAE encoder (to the posterior mean) on one height x width image."""
    return float(sum(vae_encode_flops_breakdown(vae_cfg, height, width).values()))


def _field(obj, name, default=None):
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def codec_encode_flops(codec, height: int, width: int) -> float:
    """Encode FLOPs of one image for a codec given as a run config's `codec` section (kind 'pixel'
    or 'flux2'), a Flux2VAEConfig, or a codec object (PixelCodec / Flux2Codec). Pixel codec: 0."""
    from lens_jax.models.flux2_vae import Flux2VAEConfig

    if isinstance(codec, Flux2VAEConfig):
        return vae_encode_flops(codec, height, width)
    kind = _field(codec, "kind")
    if kind == "pixel":
        return 0.0
    if kind == "flux2":
        cfg = _field(codec, "cfg")
        if not isinstance(cfg, Flux2VAEConfig):  # a config section, not a Flux2Codec
            from lens_jax.models.codec import flux2_vae_config

            cfg = flux2_vae_config(codec)
        return vae_encode_flops(cfg, height, width)
    raise ValueError(f"codec kind {kind!r}; expected 'pixel' or 'flux2' (or a Flux2VAEConfig)")


# ----------------------------------------------------------------------------------------------
# A whole training sample
# ----------------------------------------------------------------------------------------------


def train_sample_flops(run_cfg, width: int, height: int, text_tokens: int | None = None, *,
                       precomputed: bool = False) -> dict[str, float]:
    """FLOPs of one training sample of a run config (a configs/*.py ConfigDict):
    {"dit_train", "text_encoder", "vae_encode", "total"}.

    `text_tokens` are the DiT's text tokens (after the encoder's `offset` leading tokens are dropped;
    None: data.max_text_len - offset); the encoder runs on text_tokens + offset tokens. dit_train is
    model FLOPs (3 x forward); the frozen text encoder (active experts, dense attention) and the VAE
    encoder count their forward only. precomputed=True (latents and text features stored with the
    data) drops both.
    """
    from lens_jax.models.codec import codec_geometry
    from lens_jax.models.gpt_oss import GptOssConfig

    dit_cfg = DiTConfig.from_dict(run_cfg.model)
    downsample, _ = codec_geometry(run_cfg.codec)
    offset = int(run_cfg.text_encoder.offset)
    if text_tokens is None:
        text_tokens = int(run_cfg.data.max_text_len) - offset
    image_tokens = (int(width) // downsample) * (int(height) // downsample)
    dit = dit_train_flops(dit_cfg, image_tokens, int(text_tokens))
    if precomputed:
        text = vae = 0.0
    else:
        text = text_encoder_forward_flops(GptOssConfig.from_dict(run_cfg.text_encoder.model), int(text_tokens) + offset)
        vae = codec_encode_flops(run_cfg.codec, int(height), int(width))
    return {"dit_train": dit, "text_encoder": text, "vae_encode": vae, "total": dit + text + vae}


# ----------------------------------------------------------------------------------------------
# XLA's count, from the HLO of a compiled program
# ----------------------------------------------------------------------------------------------

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"^[a-z][a-z0-9]*\[([0-9,]*)\]")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
_CALLED_LIST = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _split_shape(rest: str) -> tuple[str, str]:
    """'f32[2,3]{1,0} dot(...)' -> ('f32[2,3]{1,0}', 'dot(...)'); tuple shapes are balanced-paren."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1:].lstrip()
    shape, _, tail = rest.partition(" ")
    return shape, tail.lstrip()


def _dims(shape: str) -> list[int] | None:
    m = _ARRAY.match(shape)
    return None if m is None else [int(x) for x in m.group(1).split(",") if x]


def _int_list(text: str, key: str) -> list[int]:
    m = re.search(rf"\b{key}=\{{([0-9,]*)\}}", text)
    return [] if m is None else [int(x) for x in m.group(1).split(",") if x]


def _operands(call: str) -> list[str]:
    """Operand names of 'op(%a, %b), attr=...'."""
    depth, end = 0, len(call)
    for i, ch in enumerate(call):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and ch == ")":
            end = i
            break
    return re.findall(r"%([\w.\-]+)", call[call.index("(") + 1: end])


def xla_matmul_flops(compiled_or_hlo_text, *, loop_trip_counts: bool = True) -> dict:
    """Matmul FLOPs of an XLA program, counted from its (optimised) HLO text.

    Accepts a `jax.stages.Compiled` (uses `.as_text()`) or HLO text. Every `dot` counts
    2 * prod(output) * prod(lhs contracting dims), every `convolution` 2 * prod(output) *
    prod(kernel) / kernel output features, wherever it sits (fusions included); a computation's count
    is multiplied by how often it runs: while bodies by their `known_trip_count` (XLA annotates the
    loops of lax.scan), conditional branches count as if each ran (a bound). Returns {"dot",
    "convolution", "total", "custom_calls": [targets found, not counted], "loops": [(body, trips)]}.
    Raises ValueError on a loop without a known trip count. loop_trip_counts=False counts every loop
    body once, as XLA's `cost_analysis()` does on this backend (so the two can be compared).
    """
    text = compiled_or_hlo_text if isinstance(compiled_or_hlo_text, str) else compiled_or_hlo_text.as_text()
    comps: dict[str, list[str]] = {}
    entry, cur = None, None
    for line in text.splitlines():
        if cur is None:
            m = _COMPUTATION.match(line)
            if m:
                cur = m.group(2)
                comps[cur] = []
                if m.group(1):
                    entry = cur
            continue
        if line.strip() == "}":
            cur = None
            continue
        comps[cur].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    shapes: dict[str, str] = {}
    parsed: dict[str, list[tuple[str, str, str]]] = {}
    for name, lines in comps.items():
        rows = []
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            shape, call = _split_shape(m.group(2))
            shapes[m.group(1)] = shape
            rows.append((m.group(1), shape, call))
        parsed[name] = rows

    # How many times each computation runs (sum over call sites, along the call graph from ENTRY).
    edges: dict[str, list[tuple[str, float]]] = {}
    loops = []
    for name, rows in parsed.items():
        out = []
        for inst, _, call in rows:
            opcode = call.split("(", 1)[0]
            trips = 1.0
            if opcode == "while" and loop_trip_counts:
                t = _TRIP.search(call)
                if t is None:
                    raise ValueError(f"while loop {inst} has no known trip count; cannot count its body")
                trips = float(t.group(1))
            for kind, callee in _CALLED.findall(call):
                mult = trips if kind == "body" else (trips + 1 if kind == "condition" else 1.0)
                if kind == "body":
                    t = _TRIP.search(call)
                    loops.append((callee, int(t.group(1)) if t else None))
                out.append((callee, mult))
            for _, names in _CALLED_LIST.findall(call):
                out += [(n, 1.0) for n in re.findall(r"%([\w.\-]+)", names)]
        edges[name] = out
    runs: dict[str, float] = {}

    def visit(name: str, mult: float):
        runs[name] = runs.get(name, 0.0) + mult
        for callee, m in edges.get(name, ()):
            visit(callee, mult * m)

    visit(entry, 1.0)

    dot = conv = 0.0
    custom = []
    for name, rows in parsed.items():
        mult = runs.get(name, 0.0)
        if not mult:
            continue
        for inst, shape, call in rows:
            opcode = call.split("(", 1)[0]
            if opcode == "dot":
                lhs = _dims(shapes[_operands(call)[0]])
                k = math.prod(lhs[i] for i in _int_list(call, "lhs_contracting_dims"))
                dot += mult * 2.0 * math.prod(_dims(shape)) * k
            elif opcode == "convolution":
                rhs = _dims(shapes[_operands(call)[1]])
                labels = re.search(r"dim_labels=\w+_(\w+)->", call).group(1)
                conv += mult * 2.0 * math.prod(_dims(shape)) * math.prod(rhs) / rhs[labels.index("o")]
            elif opcode == "custom-call":
                target = re.search(r'custom_call_target="([^"]*)"', call)
                custom.append(target.group(1) if target else inst)
    return {"dot": dot, "convolution": conv, "total": dot + conv, "custom_calls": custom, "loops": loops}


def xla_cost_flops(compiled) -> float:
    """XLA's own `cost_analysis()['flops']` of a compiled program: matmuls plus elementwise ops, but
    (XLA:CPU, jax 0.10) a while-loop body is counted once whatever its trip count, so a scanned model
    is undercounted by about its depth, and a convolution's padded positions are left out. Compare it
    with `xla_matmul_flops(..., loop_trip_counts=False)`. A list (older jax) or a dict is accepted."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca.get("flops", 0.0))


__all__ = [
    "MatmulParams", "dit_matmul_params", "dit_flops_breakdown", "dit_forward_flops", "dit_train_flops",
    "moe_expert_rows", "text_encoder_flops_breakdown", "text_encoder_forward_flops",
    "vae_encode_flops_breakdown", "vae_encode_flops", "codec_encode_flops", "train_sample_flops",
    "xla_matmul_flops", "xla_cost_flops",
]
