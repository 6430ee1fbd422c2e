"""python -m lens_jax.bench sample on the tiny config: a per-stage timing report."""

from __future__ import annotations

import json

from conftest import REPO


def test_bench_sample_tiny(capsys):
    from lens_jax.bench.__main__ import main

    assert main(["sample", "--config", str(REPO / "configs" / "tiny.py"), "--resolution", "32x32", "--preset", "lens",
                 "--steps", "2", "--repeats", "1", "--set", "model.num_layers=1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model_rows_per_step"] == 2 and r["steps"] == 2 and r["image_tokens"] == 64
    assert set(r["seconds_per_image"]) == {"text_encoding", "denoising", "decoding", "total"}
    assert all(v > 0 for v in r["seconds_per_image"].values())
    assert r["denoiser_tflops_per_image"] > 0
