"""`make demo` end to end on a fresh copy of the repository (minutes: run with LENS_RUN_DEMO_TEST=1)."""

from __future__ import annotations

import os
import subprocess

import pytest
from PIL import Image

from conftest import REPO


@pytest.mark.demo
@pytest.mark.skipif(os.environ.get("LENS_RUN_DEMO_TEST") != "1",
                    reason="the full demo takes ~12 min on 2 cores; set LENS_RUN_DEMO_TEST=1 to run it")
def test_make_demo_writes_the_sample_grid(tmp_path):
    clone = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    # The demo runs as a user would: without the -O0 / compilation-cache settings of tests/conftest.py.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    out = subprocess.run(["make", "demo", "DEMO_DIR=runs/demo"], cwd=clone, capture_output=True, text=True,
                         timeout=1800, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    grid = clone / "runs" / "demo" / "samples" / "latest.png"
    assert str(grid) in out.stdout
    with Image.open(grid) as im:
        assert im.size[0] > 600 and im.size[1] > 200
