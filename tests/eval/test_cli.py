"""The runner on a real (micro) pipeline and the CLI, on ground truth and on a tiny trained workdir."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import micro_config
from lens_jax.eval import EvalItem, evaluate, make_eval_items, pipeline_generate_fn, summarize
from lens_jax.eval.__main__ import main


def test_cli_ground_truth(tmp_path, capsys):
    out = tmp_path / "gt"
    scene = '{"max_groups": 2, "count_prob": 0, "text_prob": 0, "sizes": ["medium", "large"]}'
    assert main(["--ground-truth", "--out", str(out), "--per-task", "6", "--width", "32", "--height", "32",
                 "--prompt-style", "both", "--images-per-prompt", "2", "--scene-json", scene]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for style in ("short", "dense"):
        s = summary["styles"][style]
        assert s["overall"] == 1.0 and s["n"] == 6 * 6 * 2 and "counting" in s["notes"]
        assert (out / f"grid_{style}.png").stat().st_size > 0
        results = json.loads((out / f"results_{style}.json").read_text())
        assert len(results) == 72 and all(r["passed"] for r in results)
    items = [EvalItem.from_dict(d) for d in json.loads((out / "items.json").read_text())]
    assert {o.size for it in items for o in it.scene.objects} == {"medium", "large"}
    printed = capsys.readouterr().out
    assert "overall" in printed and "note counting" in printed
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x")])  # neither --weights nor --ground-truth


@pytest.fixture(scope="module")
def workdir(shapes_data_dir, tmp_path_factory):
    from lens_jax.train.loop import train

    wd = tmp_path_factory.mktemp("eval_workdir")
    cfg = micro_config(shapes_data_dir, total_steps=2, checkpoint_every=2,
                       **{"data.scene": {"max_groups": 2, "count_prob": 0.0, "sizes": ("medium", "large")}})
    train(cfg, wd, progress=False)
    return wd


def test_pipeline_generate_fn_matches_generate(workdir):
    from lens_jax.sample.pipeline import LensPipeline

    pipe = LensPipeline.from_dir(workdir)
    items = make_eval_items(1, seed=0)[:3]
    prompts = [it.short_prompt for it in items]
    fn = pipeline_generate_fn(pipe, 32, 32, steps=2, guidance=3.0, batch_size=2)  # 2 batches, the last padded
    images = fn(prompts, [5, 6, 7])
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    for p, s, im in zip(prompts, (5, 6, 7), images):
        ref = pipe.generate([p], seed=s, steps=2, guidance=3.0, width=32, height=32)[0]
        assert np.abs(im.astype(int) - ref.astype(int)).max() <= 2
    with pytest.warns(UserWarning, match="truncated"):  # dense captions run past the micro model's 32 tokens
        results = evaluate(fn, items, width=32, height=32, prompt_style="dense", seed=5)
    assert len(results) == 3 and summarize(results)["n"] == 3


def test_cli_on_a_trained_workdir(workdir, tmp_path):
    out = tmp_path / "ev"
    with pytest.warns(UserWarning, match="truncated"):
        assert main(["--weights", str(workdir), "--out", str(out), "--per-task", "2", "--steps", "2",
                     "--prompt-style", "both", "--batch-size", "8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["width"] == 32 and summary["scene_config"]["sizes"] == ["medium", "large"]
    for style in ("short", "dense"):
        s = summary["styles"][style]
        assert s["n"] == 12 and set(s["tasks"]) == {"single_object", "two_objects", "counting", "colors",
                                                     "position", "color_attr"}
        assert 0.0 <= s["overall"] <= 1.0 and "counting" in s["notes"]
        assert s["prompts_truncated"] == (12 if style == "dense" else 0)
        assert (out / f"grid_{style}.png").is_file() and (out / f"results_{style}.json").is_file()
    items = json.loads((out / "items.json").read_text())
    assert {o["size"] for it in items for o in it["scene"]["objects"]} <= {"medium", "large"}
