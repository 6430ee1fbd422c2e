"""`python -m lens_jax.budget compare`: the paper's 0.61 (raw hours) and 0.193 (peak-normalised) from the
SPEC section 7 figures, PixArt-alpha's two figures, and the CLI."""

from __future__ import annotations

import json

import pytest

from lens_jax.budget import published
from lens_jax.budget.__main__ import main


def test_lens_vs_z_image_ratios_reproduce_the_paper():
    # SPEC section 7: Lens ~192K A100-h, Z-Image ~314K H800-h; peaks 312 and 989 TFLOP/s.
    assert round(published.ratio_raw(published.LENS), 2) == 0.61
    assert round(published.ratio_raw(published.LENS), 3) == round(192 / 314, 3) == 0.611
    assert round(published.ratio_peak_normalised(published.LENS), 3) == 0.193
    assert published.ratio_peak_normalised(published.LENS) == pytest.approx(192e3 / (314e3 * 989 / 312), rel=1e-12)
    assert published.Z_IMAGE.a100_equivalent_hours == pytest.approx(314e3 * 989 / 312)


def test_published_rows():
    rows = {r["model"]: r for r in published.comparison_rows()}
    assert rows["SD 1.x"]["device_hours"] == 150e3 and rows["SD 2.x"]["device_hours"] == 200e3
    assert rows["PixArt-alpha (abstract)"]["device_hours"] == 675 * 24
    assert rows["PixArt-alpha (appendix)"]["device_hours"] == 753 * 24
    assert rows["Wuerstchen v2"]["device_hours"] == 24_602
    for r in rows.values():  # A100 figures are their own A100-equivalent
        if r["hardware"] == "a100":
            assert r["a100_equivalent_hours"] == r["device_hours"]
    assert rows["Z-Image"]["ratio_raw_to_reference"] == 1.0


def test_compare_cli_text_and_json(capsys):
    assert main(["compare"]) == 0
    out = capsys.readouterr().out
    assert "0.611" in out and "0.193" in out and "19.3%" in out and "peak-FLOP/s normalisation" in out
    assert "675 A100-days" in out and "753 A100-days" in out
    assert "imply MFU" in out

    assert main(["compare", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert round(data["lens_vs_z_image_raw"], 3) == 0.611
    assert round(data["lens_vs_z_image_peak_normalised"], 3) == 0.193
    implied = data["implied"]
    assert 0 < implied["implied_mfu_dit_only"] < implied["implied_mfu_all_flops"] < 1
    # 192K A100-hours at 312 TFLOP/s
    assert implied["implied_mfu_all_flops"] == pytest.approx(implied["flops"]["total"] / (192e3 * 3600 * 312e12))
