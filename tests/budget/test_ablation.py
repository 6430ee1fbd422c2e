"""The caption-density ablation end to end at a micro budget: report, plots and scores JSON, equal FLOPs."""

from __future__ import annotations

import json

import pytest

from conftest import micro_config


@pytest.fixture(scope="module")
def ablation(tmp_path_factory, shapes_data_dir):
    from lens_jax.budget.ablation import plan_arms, run_ablation

    # micro_config's data.max_text_len (32) is sized for nothing in particular: each arm sizes its own text
    cfg = micro_config(shapes_data_dir, **{"sample.steps": 2, "log_every": 1})
    out = tmp_path_factory.mktemp("ablation")
    one_step_dense = plan_arms(cfg, 1e15, eval_points=1, arms=["dense"])[0].flops_per_step
    budget = 4.5 * one_step_dense  # dense: 2 checkpoints of 2 steps; short: more, cheaper steps
    results = run_ablation(cfg, out, budget, eval_points=2, per_task=2, progress=False)
    return cfg, out, budget, results


def test_arms_spend_equal_flops_and_pay_for_their_text(ablation):
    cfg, out, budget, results = ablation
    plans = {arm: r["plan"] for arm, r in results["arms"].items()}
    assert set(plans) == {"dense", "mix", "short"}
    for arm, p in plans.items():
        # every arm ends within one checkpoint interval below the budget, never above
        assert p["total_flops"] <= budget
        assert budget - p["total_flops"] < p["flops_per_step"] * p["checkpoint_every"] * 2, arm
        assert p["eval_steps"] == [p["checkpoint_every"], 2 * p["checkpoint_every"]]
    # dense captions are longer than short ones: fewer steps for the same FLOPs
    assert plans["dense"]["max_text_len"] > plans["short"]["max_text_len"]
    assert plans["dense"]["flops_per_step"] > plans["short"]["flops_per_step"]
    assert plans["dense"]["steps"] < plans["short"]["steps"]
    assert plans["mix"]["max_text_len"] == plans["dense"]["max_text_len"]
    assert plans["dense"]["max_text_len"] >= 100 > 32 >= plans["short"]["max_text_len"]  # dense captions are not cut
    assert plans["dense"]["mean_text_tokens"] > plans["mix"]["mean_text_tokens"] > plans["short"]["mean_text_tokens"]
    assert plans["short"]["text_image_ratio"] == pytest.approx(plans["short"]["mean_text_tokens"] / 16)


def test_report_plots_and_json(ablation):
    cfg, out, budget, results = ablation
    for name in ("report.md", "scores.json", "plan.json", "shapeseval_vs_flops.png", "shapeseval_per_task.png",
                 "loss_vs_flops.png"):
        assert (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = json.loads((out / "scores.json").read_text())
    assert scores["ground_truth"]["overall"] >= 0.98  # the detector's ceiling on this world
    assert scores["noise_floor"]["overall"] < 0.5  # and its floor: noise images are not drawings
    for arm, r in scores["arms"].items():
        assert [c["step"] for c in r["checkpoints"]] == r["plan"]["eval_steps"]
        for c in r["checkpoints"]:
            for style in ("short", "dense"):
                s = c[style]
                assert 0.0 <= s["overall"] <= 1.0
                assert set(s["tasks"]) == {"single_object", "two_objects", "counting", "colors", "position",
                                           "color_attr"}
        assert len(r["loss"]) == r["plan"]["steps"]  # log_every=1
        assert (out / "arms" / arm / "eval" / f"step_{r['plan']['steps']}_short.png").exists()
    report = (out / "report.md").read_text()
    for text in ("text/image tokens", "dense", "mix", "short", "shapeseval_vs_flops.png", "Ranking"):
        assert text in report
    assert "Warning: 16 image tokens" in report  # micro images are far below the real model's proportions


def test_rerun_resumes_from_cached_work(ablation):
    """A second run finds every arm trained and every checkpoint evaluated: nothing is redone."""
    from lens_jax.budget.ablation import run_ablation

    cfg, out, budget, results = ablation
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("arms/*/eval/*.json")}
    again = run_ablation(cfg, out, budget, eval_points=2, per_task=2, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.glob("arms/*/eval/*.json")} == stamps
    assert again["arms"] == json.loads(json.dumps(results["arms"]))


def test_budget_too_small_names_the_flag(shapes_data_dir):
    from lens_jax.budget.ablation import plan_arms

    cfg = micro_config(shapes_data_dir)
    with pytest.raises(ValueError, match="--budget-flops"):
        plan_arms(cfg, 1.0, eval_points=2)
