"""Published training budgets (SPEC section 7) and the paper's Lens vs Z-Image comparison.

Two ways to compare device-hours on different chips:
- raw: hours as reported, whatever the chip (Lens 192K A100-h / Z-Image 314K H800-h = 0.61);
- peak-normalised: hours x peak bf16 FLOP/s of the chip / A100's 312 TFLOP/s, i.e. A100-equivalent
  hours at equal utilisation (192K / (314K x 989/312) = 0.193). The paper's "19.3%" is this one.
"""

from __future__ import annotations

import dataclasses
import pathlib

from lens_jax.budget.hardware import PEAK_BF16_FLOPS


@dataclasses.dataclass(frozen=True)
class PublishedBudget:
    model: str
    hours: float  # device-hours as reported (days are converted x 24)
    hardware: str  # key of PEAK_BF16_FLOPS
    reported: str  # the figure as the source states it
    params: str = ""
    source: str = ""

    @property
    def a100_equivalent_hours(self) -> float:
        """Hours x peak FLOP/s of the chip / A100 peak: A100-hours at the same utilisation."""
        return self.hours * PEAK_BF16_FLOPS[self.hardware] / PEAK_BF16_FLOPS["a100"]

    @property
    def peak_flop(self) -> float:
        """Device-hours x peak FLOP/s: the compute the hours could deliver at 100% utilisation."""
        return self.hours * 3600.0 * PEAK_BF16_FLOPS[self.hardware]


LENS = PublishedBudget("Lens", 192e3, "a100", "~192K A100 GPU-hours", "3.8B dual-stream", "Lens paper")
Z_IMAGE = PublishedBudget("Z-Image", 314e3, "h800", "~314K H800 GPU-hours", "6.15B single-stream",
                          "as the Lens paper quotes it")

PUBLISHED: tuple[PublishedBudget, ...] = (
    LENS,
    Z_IMAGE,
    PublishedBudget("SD 1.x", 150e3, "a100", "150K A100-hours", "", "published budget"),
    PublishedBudget("SD 2.x", 200e3, "a100", "200K A100-hours", "", "published budget"),
    PublishedBudget("PixArt-alpha (abstract)", 675 * 24.0, "a100", "675 A100-days", "", "PixArt-alpha abstract"),
    PublishedBudget("PixArt-alpha (appendix)", 753 * 24.0, "a100", "753 A100-days", "", "PixArt-alpha appendix"),
    PublishedBudget("Wuerstchen v2", 24_602.0, "a100", "24,602 A100-hours", "", "published budget"),
)


def ratio_raw(a: PublishedBudget, b: PublishedBudget = Z_IMAGE) -> float:
    """Reported hours over reported hours, chips ignored (the 0.61)."""
    return a.hours / b.hours


def ratio_peak_normalised(a: PublishedBudget, b: PublishedBudget = Z_IMAGE) -> float:
    """A100-equivalent hours over A100-equivalent hours (the paper's 0.193)."""
    return a.a100_equivalent_hours / b.a100_equivalent_hours


def comparison_rows(reference: PublishedBudget = Z_IMAGE) -> list[dict]:
    rows = []
    for p in PUBLISHED:
        rows.append({
            "model": p.model,
            "params": p.params,
            "reported": p.reported,
            "hardware": p.hardware,
            "peak_tflops": PEAK_BF16_FLOPS[p.hardware] / 1e12,
            "device_hours": p.hours,
            "a100_equivalent_hours": p.a100_equivalent_hours,
            "ratio_raw_to_reference": ratio_raw(p, reference),
            "ratio_peak_normalised_to_reference": ratio_peak_normalised(p, reference),
        })
    return rows


def implied_mfu(total_flops: float, hours: float = LENS.hours, hardware: str = LENS.hardware) -> float:
    """The model-FLOPs utilisation a reported budget implies for a computed FLOP count."""
    return total_flops / (hours * 3600.0 * PEAK_BF16_FLOPS[hardware])


def lens_paper_implied_mfu(config: str = "configs/lens_3p8b.py",
                           schedule: str = "configs/schedules/lens_paper.py") -> dict:
    """The MFU the paper's 192K A100-hours imply for a config + schedule (with and without the
    frozen text encoder and VAE FLOPs)."""
    from lens_jax.budget.estimate import RunModel, estimate_flops
    from lens_jax.budget.schedule import load_schedule
    from lens_jax.config import load_config

    model = RunModel.from_run_config(load_config(config))
    flops = estimate_flops(model, load_schedule(schedule, px_per_token=model.px_per_token))["flops"]
    return {"config": str(config), "schedule": str(schedule), "flops": flops,
            "implied_mfu_all_flops": implied_mfu(flops["total"]),
            "implied_mfu_dit_only": implied_mfu(flops["dit_train"])}


REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = "configs/lens_3p8b.py"
DEFAULT_SCHEDULE = "configs/schedules/lens_paper.py"


def _find(path: str) -> pathlib.Path | None:
    """A path as given, else relative to the repository root (the configs/ of a source checkout)."""
    for p in (pathlib.Path(path), REPO / path):
        if p.exists():
            return p
    return None


def compare(config: str | None = DEFAULT_CONFIG, schedule: str | None = DEFAULT_SCHEDULE) -> dict:
    """The comparison table as a JSON-able dict; with config and schedule (found as given or under
    the repository root), also the MFU the paper's 192K A100-hours imply for them."""
    out = {
        "reference": Z_IMAGE.model,
        "rows": comparison_rows(Z_IMAGE),
        "lens_vs_z_image_raw": ratio_raw(LENS),
        "lens_vs_z_image_peak_normalised": ratio_peak_normalised(LENS),
        "note": "the paper's 19.3% is the peak-FLOP/s-normalised ratio: 192K / (314K x 989/312)",
    }
    if config and schedule:
        cfg_path, sched_path = _find(config), _find(schedule)
        if cfg_path is None or sched_path is None:
            out["implied_missing"] = f"{config if cfg_path is None else schedule} not found"
        else:
            out["implied"] = lens_paper_implied_mfu(str(cfg_path), str(sched_path))
            out["implied"].update(config=str(config), schedule=str(schedule))
    return out


def format_compare(c: dict) -> str:
    from lens_jax.budget.estimate import table

    rows = [[r["model"], r["reported"], r["hardware"], f"{r['peak_tflops']:.0f}", f"{r['device_hours']:,.0f}",
             f"{r['a100_equivalent_hours']:,.0f}", f"{r['ratio_raw_to_reference']:.3f}",
             f"{r['ratio_peak_normalised_to_reference']:.3f}"] for r in c["rows"]]
    lines = [
        "Published training budgets (SPEC section 7); A100-equivalent hours = hours x peak bf16 FLOP/s / 312 TFLOP/s",
        table(["model", "reported", "chip", "peak TFLOP/s", "device-hours", "A100-eq hours",
               f"raw / {c['reference']}", f"A100-eq / {c['reference']}"], rows, align="lllrrrrr"),
        "",
        f"Lens vs Z-Image: raw device-hours {c['lens_vs_z_image_raw']:.3f} (192K A100-h / 314K H800-h, chips ignored); "
        f"peak-FLOP/s-normalised {c['lens_vs_z_image_peak_normalised']:.3f} (192K / (314K x 989/312)).",
        "The paper's 19.3% uses the peak-FLOP/s normalisation: it counts an H800-hour as 989/312 = 3.17 A100-hours "
        "(equal utilisation assumed).",
    ]
    if "implied_missing" in c:
        lines.append(f"(implied MFU line skipped: {c['implied_missing']})")
    if "implied" in c:
        i = c["implied"]
        lines.append(
            f"For {i['schedule']} with {i['config']} ({i['flops']['total']:.3e} FLOPs in all, "
            f"{i['flops']['dit_train']:.3e} DiT train), 192K A100-hours imply MFU {i['implied_mfu_all_flops']:.3f} "
            f"with the frozen text encoder + VAE FLOPs, {i['implied_mfu_dit_only']:.3f} with DiT FLOPs only.")
    return "\n".join(lines)
