"""GPU-hour calculator: a run config (the model) + a schedule (stages x batch x bucket mix) -> FLOPs,
device-hours at an MFU, cost, and the MFU a reported budget implies.

Per training sample of a bucket W x H with T_txt DiT text tokens and T_enc encoder tokens:
- DiT train: `dit_train_flops(dit, (W/16)(H/16), T_txt)`, model FLOPs = 3 x forward (SPEC section 7);
- frozen text encoder forward: `text_encoder_forward_flops(gpt_oss, T_enc)` (active experts, up to
  the last selected layer), 0 when the schedule stage has precomputed_text;
- VAE encode: `codec_encode_flops(codec, H, W)`, 0 when the stage has precomputed_latents.
A stage's FLOPs are the sum over its buckets of (expected samples of that bucket) x (FLOPs per sample).

Device-hours = FLOPs / (MFU x peak bf16 FLOP/s) / 3600. The MFU is a ratio of *some* FLOP count to
peak, so the basis matters:
- basis 'all' (default with --mfu): every counted FLOP (DiT train + frozen forwards) runs at that MFU;
- basis 'dit': the MFU the training loop and the bench log (SPEC section 7: DiT model FLOPs over
  step time x peak); the frozen forwards, if they run inside the step, are then part of the step
  time the MFU was measured with. --measured-mfu-from uses this basis by default.
Both are reported; `device_hours` follows the selected basis.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

from lens_jax.budget.hardware import PEAK_BF16_FLOPS
from lens_jax.budget.published import LENS, implied_mfu
from lens_jax.budget.schedule import Schedule, Stage, load_schedule

FLOP_PARTS = ("dit_train", "text_encoder", "vae_encode")


@dataclasses.dataclass(frozen=True)
class RunModel:
    """What the calculator needs from a run config."""

    dit: Any  # DiTConfig
    text_encoder: Any  # GptOssConfig
    codec: Any  # the run config's codec section
    px_per_token: int
    text_offset: int
    max_text_len: int
    dit_params: int
    name: str = ""

    @classmethod
    def from_run_config(cls, cfg) -> "RunModel":
        from lens_jax.models.codec import codec_geometry
        from lens_jax.models.dit import DiTConfig, dit_param_count
        from lens_jax.models.gpt_oss import GptOssConfig

        dit = DiTConfig.from_dict(cfg.model)
        return cls(
            dit=dit, text_encoder=GptOssConfig.from_dict(cfg.text_encoder.model), codec=cfg.codec,
            px_per_token=codec_geometry(cfg.codec)[0], text_offset=int(cfg.text_encoder.offset),
            max_text_len=int(cfg.data.max_text_len), dit_params=dit_param_count(dit), name=str(cfg.name),
        )


def sample_flops(model: RunModel, width: int, height: int, dit_text_tokens: int, encoder_tokens: int, *,
                 precomputed_text: bool = False, precomputed_latents: bool = False) -> dict[str, float]:
    """FLOPs of one training sample, by part (dit_train, text_encoder, vae_encode, total)."""
    from lens_jax.budget.flops import codec_encode_flops, dit_train_flops, text_encoder_forward_flops

    image_tokens = (width // model.px_per_token) * (height // model.px_per_token)
    out = {
        "dit_train": dit_train_flops(model.dit, image_tokens, int(dit_text_tokens)),
        "text_encoder": 0.0 if precomputed_text or encoder_tokens <= 0
        else text_encoder_forward_flops(model.text_encoder, int(encoder_tokens)),
        "vae_encode": 0.0 if precomputed_latents else codec_encode_flops(model.codec, height, width),
    }
    out["total"] = sum(out[k] for k in FLOP_PARTS)
    return out


def stage_text_tokens(model: RunModel, stage: Stage) -> tuple[int, int]:
    """(DiT text tokens, encoder tokens) per sample, rounded to whole tokens."""
    dit, enc = stage.text_lengths(model.text_offset, model.max_text_len)
    return int(round(dit)), int(round(enc))


def estimate_stage(model: RunModel, stage: Stage) -> dict:
    dit_txt, enc_txt = stage_text_tokens(model, stage)
    flops = {k: 0.0 for k in (*FLOP_PARTS, "total")}
    buckets = []
    image_token_samples = 0.0
    for bucket, n in stage.samples_by_bucket():
        per = sample_flops(model, bucket.width, bucket.height, dit_txt, enc_txt,
                           precomputed_text=stage.precomputed_text, precomputed_latents=stage.precomputed_latents)
        tokens = bucket.image_tokens(model.px_per_token)
        image_token_samples += n * tokens
        for k in flops:
            flops[k] += n * per[k]
        buckets.append({"bucket": bucket.label, "weight": bucket.weight, "batch_per_step": stage.batch_for(bucket),
                        "samples": n, "image_tokens": tokens, "flops_per_sample": per})
    samples = stage.samples
    return {
        "name": stage.name,
        "steps": stage.steps,
        "devices": stage.devices,
        "samples": samples,
        "mean_global_batch": samples / stage.steps,
        "image_tokens_per_sample": image_token_samples / samples,
        "image_tokens_range": [min(b["image_tokens"] for b in buckets), max(b["image_tokens"] for b in buckets)],
        "dit_text_tokens": dit_txt,
        "encoder_tokens": enc_txt,
        "precomputed_text": stage.precomputed_text,
        "precomputed_latents": stage.precomputed_latents,
        "flops": flops,
        "buckets": buckets,
    }


def estimate_flops(model: RunModel, schedule: Schedule) -> dict:
    stages = [estimate_stage(model, s) for s in schedule.stages]
    total = {k: sum(s["flops"][k] for s in stages) for k in (*FLOP_PARTS, "total")}
    return {"stages": stages, "flops": total, "samples": sum(s["samples"] for s in stages),
            "steps": schedule.steps}


def device_hours(flops: float, hardware: str, mfu: float) -> float:
    return flops / (mfu * peak_flops(hardware)) / 3600.0


def peak_flops(hardware: str) -> float:
    if hardware not in PEAK_BF16_FLOPS:
        raise ValueError(f"unknown hardware {hardware!r}; known: {', '.join(PEAK_BF16_FLOPS)}")
    return PEAK_BF16_FLOPS[hardware]


def measured_mfu(workdir: str | pathlib.Path, warmup_records: int = 1) -> dict:
    """Mean of the non-null `mfu` values a training run logged in WORKDIR/metrics.jsonl, after
    dropping the first `warmup_records` logged lines (the first window includes XLA compilation)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"--measured-mfu-from: {path} does not exist (the training loop writes it)")
    records = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"--measured-mfu-from: {path} line {i + 1} is not JSON: {e}") from None
    kept = records[warmup_records:]
    values = [float(r["mfu"]) for r in kept if isinstance(r.get("mfu"), (int, float)) and not isinstance(r["mfu"], bool)
              and math.isfinite(r["mfu"]) and r["mfu"] > 0]
    if not values:
        n_any = sum(1 for r in records if isinstance(r.get("mfu"), (int, float)))
        raise ValueError(
            f"--measured-mfu-from: {path} has no non-null 'mfu' value after the first {warmup_records} "
            f"(warm-up) record(s): {len(records)} records, {n_any} with an mfu (mfu is null on CPU, where "
            f"no peak FLOP/s is known; set config.hardware.peak_flops to log one)")
    steps = [r.get("step") for r in kept if r.get("mfu") is not None]
    return {"mfu": sum(values) / len(values), "records": len(values), "path": str(path),
            "first_step": steps[0] if steps else None, "last_step": steps[-1] if steps else None,
            "warmup_records": warmup_records}


def estimate(config: str | pathlib.Path, schedule: str | pathlib.Path, hardware: str = "a100", *,
             mfu: float | None = None, price_per_hour: float | None = None,
             measured_mfu_from: str | pathlib.Path | None = None, warmup_records: int = 1,
             mfu_basis: str | None = None) -> dict:
    """The whole estimate as a JSON-able dict (what the CLI prints)."""
    from lens_jax.config import load_config

    peak = peak_flops(hardware)
    cfg = load_config(config)
    model = RunModel.from_run_config(cfg)
    sched = load_schedule(schedule, px_per_token=model.px_per_token)
    result = estimate_flops(model, sched)

    measured = None
    if measured_mfu_from is not None and mfu is not None:
        raise ValueError("give --mfu or --measured-mfu-from, not both")
    if measured_mfu_from is not None:
        measured = measured_mfu(measured_mfu_from, warmup_records)
        used_mfu, mfu_source = measured["mfu"], "measured"
        basis = mfu_basis or "dit"
    else:
        used_mfu, mfu_source = (0.4 if mfu is None else float(mfu)), "given"
        basis = mfu_basis or "all"
    if not 0 < used_mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {used_mfu}")
    if basis not in ("all", "dit"):
        raise ValueError(f"mfu basis {basis!r}; expected 'all' or 'dit'")

    total = result["flops"]["total"]
    dit = result["flops"]["dit_train"]
    hours_all = device_hours(total, hardware, used_mfu)
    hours_dit = device_hours(dit, hardware, used_mfu)
    hours = hours_all if basis == "all" else hours_dit
    for s in result["stages"]:
        s["device_hours_all_basis"] = device_hours(s["flops"]["total"], hardware, used_mfu)
        s["device_hours_dit_basis"] = device_hours(s["flops"]["dit_train"], hardware, used_mfu)
        s["device_hours"] = s["device_hours_all_basis"] if basis == "all" else s["device_hours_dit_basis"]
        s["wall_days"] = s["device_hours"] / s["devices"] / 24.0 if s["devices"] else None
    result.update(
        config=str(config), schedule=str(schedule), schedule_name=sched.name, model=model.name,
        dit_params=model.dit_params, hardware=hardware, peak_flops=peak, mfu=used_mfu, mfu_source=mfu_source,
        mfu_basis=basis, measured=measured,
        device_hours=hours, device_hours_all_basis=hours_all, device_hours_dit_basis=hours_dit,
        device_days=hours / 24.0,
        price_per_hour=price_per_hour,
        cost=None if price_per_hour is None else hours * float(price_per_hour),
        paper={
            "reported_a100_hours": LENS.hours,
            "implied_mfu_all_flops": implied_mfu(total),
            "implied_mfu_dit_only": implied_mfu(dit),
            "a100_hours_at_this_mfu_all_basis": device_hours(total, "a100", used_mfu),
            "a100_hours_at_this_mfu_dit_basis": device_hours(dit, "a100", used_mfu),
        },
    )
    return result


# ------------------------------------------------------------------------------------------------
# Text output
# ------------------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """Plain aligned text table; align is one 'l'/'r' per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def fmt(row):
        return "  ".join(str(x).ljust(w) if a == "l" else str(x).rjust(w) for x, w, a in zip(row, widths, align)).rstrip()

    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def _e(x: float) -> str:
    return f"{x:.3e}"


def _n(x: float) -> str:
    """Whole numbers with separators; small values to 3 significant digits (a tiny run's hours)."""
    return f"{x:,.0f}" if abs(x) >= 100 or x == 0 else f"{x:.3g}"


def format_estimate(r: dict, show_buckets: bool = False) -> str:
    hw = r["hardware"].upper()
    lines = [
        f"config   {r['config']} ({r['model']}, DiT {r['dit_params'] / 1e9:.3f}B params)",
        f"schedule {r['schedule']} ({r['schedule_name']}: {len(r['stages'])} stages, {_n(r['steps'])} steps, "
        f"{r['samples']:.4g} samples)",
        "",
        table(
            ["stage", "steps", "mean batch", "samples", "img tok/sample", "img tok range", "txt tok DiT", "txt tok enc",
             "precomputed"],
            [[s["name"], _n(s["steps"]), f"{s['mean_global_batch']:,.1f}", f"{s['samples']:.4g}",
              f"{s['image_tokens_per_sample']:,.0f}", f"{s['image_tokens_range'][0]}-{s['image_tokens_range'][1]}",
              str(s["dit_text_tokens"]), str(s["encoder_tokens"]),
              ",".join(x for x, f in (("text", s["precomputed_text"]), ("latents", s["precomputed_latents"])) if f)
              or "none"] for s in r["stages"]],
        ),
        "",
        "FLOPs (DiT train = 3 x forward model FLOPs; frozen text encoder and VAE: forward only)",
        table(
            ["stage", "DiT train", "text encoder fwd", "VAE encode", "total", "frozen share",
             f"{hw}-h (all)", f"{hw}-h (DiT)"],
            [[s["name"], _e(s["flops"]["dit_train"]), _e(s["flops"]["text_encoder"]), _e(s["flops"]["vae_encode"]),
              _e(s["flops"]["total"]), f"{1 - s['flops']['dit_train'] / s['flops']['total']:.1%}",
              _n(s["device_hours_all_basis"]), _n(s["device_hours_dit_basis"])] for s in r["stages"]]
            + [["total", _e(r["flops"]["dit_train"]), _e(r["flops"]["text_encoder"]), _e(r["flops"]["vae_encode"]),
                _e(r["flops"]["total"]), f"{1 - r['flops']['dit_train'] / r['flops']['total']:.1%}",
                _n(r["device_hours_all_basis"]), _n(r["device_hours_dit_basis"])]],
        ),
    ]
    if show_buckets:
        for s in r["stages"]:
            lines += ["", f"{s['name']}: per bucket",
                      table(["bucket", "weight", "batch/step", "samples", "img tokens", "FLOPs/sample"],
                            [[b["bucket"], f"{b['weight']:.4f}", str(b["batch_per_step"]), f"{b['samples']:.4g}",
                              str(b["image_tokens"]), _e(b["flops_per_sample"]["total"])] for b in s["buckets"]])]
    if r["mfu_source"] == "measured":
        m = r["measured"]
        src = (f"measured: mean of {m['records']} logged values, steps {m['first_step']}..{m['last_step']}, "
               f"of {m['path']}; the training loop's MFU counts DiT FLOPs")
    else:
        src = "given"
    sel = {"all": "  <- used", "dit": ""} if r["mfu_basis"] == "all" else {"all": "", "dit": "  <- used"}
    lines += [
        "",
        f"hardware {r['hardware']}: peak {r['peak_flops'] / 1e12:.0f} TFLOP/s bf16 per device; "
        f"MFU {r['mfu']:.3f} ({src})",
        f"device-hours at MFU {r['mfu']:.3f}:",
        f"  MFU over all counted FLOPs:            {_n(r['device_hours_all_basis'])} {hw}-hours "
        f"= {_n(r['device_hours_all_basis'] / 24)} {hw}-days{sel['all']}",
        f"  MFU over DiT FLOPs (train loop's MFU): {_n(r['device_hours_dit_basis'])} {hw}-hours "
        f"= {_n(r['device_hours_dit_basis'] / 24)} {hw}-days{sel['dit']}",
    ]
    walls = [f"{s['name']} {s['wall_days']:,.1f} days on {s['devices']}" for s in r["stages"] if s["wall_days"]]
    if walls:
        lines.append(f"  wall-clock at that rate: {'; '.join(walls)}")
    if r["cost"] is not None:
        lines.append(f"cost at {r['price_per_hour']:g} per device-hour: {_n(r['cost'])}")
    p = r["paper"]
    lines += [
        f"the paper's {p['reported_a100_hours'] / 1e3:.0f}K A100-hours imply MFU {p['implied_mfu_all_flops']:.3g} "
        f"counting the frozen encoder + VAE FLOPs, {p['implied_mfu_dit_only']:.3g} counting DiT FLOPs only "
        f"(FLOPs / (192e3 x 3600 x 312e12))",
    ]
    return "\n".join(lines)
