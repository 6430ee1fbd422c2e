"""End to end on tiny weights from a 2-step micro training run: the pipeline and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, micro_config


@pytest.fixture(scope="module")
def workdir(shapes_data_dir, tmp_path_factory):
    from lens_jax.train.loop import train

    wd = tmp_path_factory.mktemp("gen_workdir")
    cfg = micro_config(shapes_data_dir, total_steps=2, checkpoint_every=2, **{"optimizer.ema_decay": 0.9})
    train(cfg, wd, progress=False)
    return wd


@pytest.fixture(scope="module")
def pipe(workdir):
    from lens_jax.sample.pipeline import LensPipeline

    return LensPipeline.from_dir(workdir)


PROMPTS = ["a red circle", "a large blue square on the left of a small green triangle", "a yellow star"]


def test_loads_workdir_with_ema(pipe, workdir):
    assert pipe.source.endswith("(ema)")
    assert pipe.codec.kind == "pixel" and pipe.default_size == (32, 32)
    assert pipe.max_text_len == 32 and pipe.offset == 0


def test_batch_equals_single_runs_and_seed_determinism(pipe):
    batch = pipe.generate(PROMPTS, seed=3, steps=3, num_images=2)
    assert batch.shape == (6, 32, 32, 3) and batch.dtype == np.uint8
    for i, p in enumerate(PROMPTS):
        single = pipe.generate([p], seed=3, steps=3, num_images=2)
        np.testing.assert_array_equal(batch[2 * i:2 * i + 2], single)
    assert not np.array_equal(batch[0], batch[1])  # image index j draws its own noise
    assert not np.array_equal(pipe.generate(PROMPTS[:1], seed=4, steps=3)[0], batch[0])


def test_non_square_negative_prompt_and_turbo(pipe):
    img = pipe.generate(PROMPTS[:1], width=64, height=32, steps=2, negative_prompt="a blue square")
    assert img.shape == (1, 32, 64, 3)
    turbo = pipe.generate(PROMPTS[:2], preset="turbo")
    assert turbo.shape == (2, 32, 32, 3)


def test_negative_features_padding(pipe):
    h, m = pipe.encode_prompts(["a red circle"])
    ch, cm, nh, nm = pipe.negative_features("", h, m)
    assert nh.shape == h.shape and not np.asarray(nm).any() and not np.asarray(nh).any()
    ch, cm, nh, nm = pipe.negative_features("a large blue square on the left of a small green triangle", h, m)
    assert ch.shape == nh.shape and ch.shape[1] > h.shape[1]
    assert np.asarray(cm).sum() == np.asarray(m).sum() and np.asarray(nm).all()
    assert not np.asarray(ch[:, h.shape[1]:]).any()  # zero padding


def test_bad_sizes_name_nearest_valid():
    from lens_jax.models.codec import PixelCodec
    from lens_jax.sample.pipeline import check_size

    check_size(32, 32, PixelCodec(8))
    with pytest.raises(ValueError, match="nearest valid size: 32x32"):
        check_size(30, 32, PixelCodec(8))
    with pytest.raises(ValueError, match="nearest valid size: 2048x8"):
        check_size(4000, 4, PixelCodec(8))
    flux = types.SimpleNamespace(kind="flux2", downsample=16, channels=128)
    check_size(1472, 736, flux)
    with pytest.raises(ValueError, match="nearest valid size: 256x1008"):
        check_size(32, 1001, flux)
    check_size(32, 32, flux, allow_small=True)
    with pytest.raises(ValueError, match="nearest valid size: 1024x1024"):
        check_size(1020, 1024, flux)


def test_cli_pngs_deterministic_with_metadata(workdir, tmp_path, capsys):
    from lens_jax.generate import main

    args = ["--weights", str(workdir), "--prompt", PROMPTS[0], "--width", "64", "--height", "32", "--steps", "2",
            "--seed", "7", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a.png")]) == 0
    assert main(args + ["--out", str(tmp_path / "b.png")]) == 0
    a, b = (tmp_path / "a.png").read_bytes(), (tmp_path / "b.png").read_bytes()
    assert a == b
    im = Image.open(tmp_path / "a.png")
    assert im.size == (64, 32)
    assert im.text["prompt"] == PROMPTS[0] and im.text["seed"] == "7" and im.text["steps"] == "2"
    # many images -> a directory; a .png --out for many images is refused
    pf = tmp_path / "prompts.txt"
    pf.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[2]}\n")
    assert main(["--weights", str(workdir), "--prompt-file", str(pf), "--num-images", "2", "--steps", "2",
                 "--out", str(tmp_path / "many"), "--quiet"]) == 0
    files = sorted(p.name for p in (tmp_path / "many").iterdir())
    assert files == ["000_00_seed0.png", "000_01_seed0.png", "001_00_seed0.png", "001_01_seed0.png"]
    assert Image.open(tmp_path / "many" / "001_01_seed0.png").text["prompt"] == PROMPTS[2]
    with pytest.raises(SystemExit):
        main(["--weights", str(workdir), "--prompt", "x", "--num-images", "2", "--out", str(tmp_path / "c.png")])
    with pytest.raises(SystemExit):
        main(["--weights", str(workdir), "--prompt", "x", "--width", "36", "--out", str(tmp_path / "d.png")])
    assert "nearest valid size: 40x32" in capsys.readouterr().err


def test_cli_subprocess_on_workdir(workdir, tmp_path):
    out = tmp_path / "g.png"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "lens_jax.generate", "--weights", str(workdir), "--prompt",
                        "a red circle and a blue square", "--width", "32", "--height", "32", "--steps", "2",
                        "--out", str(out), "--seed", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Image.open(out).size == (32, 32)


def test_reasoner_rewrite_is_used_and_failures_fall_back(workdir, tmp_path):
    """--reasoner against a local OpenAI-compatible server on 127.0.0.1: its rewrite is what gets
    encoded; a server answering 500s or too slowly still yields the original prompt's image."""
    from test_reasoner import FakeLLM

    from lens_jax.generate import main
    from lens_jax.sample.reasoner import ReasonerWarning

    dense = "a large red circle in the center on a gray background"
    base = ["--weights", str(workdir), "--width", "32", "--height", "32", "--steps", "2", "--seed", "3", "--quiet"]

    def pixels(path):
        return np.asarray(Image.open(path))

    main(base + ["--prompt", dense, "--out", str(tmp_path / "dense.png")])
    main(base + ["--prompt", "red circle", "--out", str(tmp_path / "plain.png")])
    assert not np.array_equal(pixels(tmp_path / "dense.png"), pixels(tmp_path / "plain.png"))

    server = FakeLLM(lambda body, n: (200, dense, {}, 0))
    try:
        main(base + ["--prompt", "red circle", "--reasoner", "m", "--reasoner-base-url", server.base_url,
                     "--out", str(tmp_path / "rewritten.png")])
    finally:
        server.stop()
    assert server.requests and any(m.get("content") == "red circle" for m in server.requests[0]["messages"])
    im = Image.open(tmp_path / "rewritten.png")
    assert im.text["prompt"] == "red circle" and im.text["encoded_prompt"] == dense
    np.testing.assert_array_equal(pixels(tmp_path / "rewritten.png"), pixels(tmp_path / "dense.png"))

    for name, script in (("500", lambda body, n: (500, None, {}, 0)), ("slow", lambda body, n: (200, dense, {}, 5))):
        server = FakeLLM(script)
        try:
            with pytest.warns(ReasonerWarning):
                assert main(base + ["--prompt", "red circle", "--reasoner", "m", "--reasoner-base-url",
                                    server.base_url, "--reasoner-timeout", "0.5",
                                    "--out", str(tmp_path / f"{name}.png")]) == 0
        finally:
            server.stop()
        np.testing.assert_array_equal(pixels(tmp_path / f"{name}.png"), pixels(tmp_path / "plain.png"))
