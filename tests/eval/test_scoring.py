"""The detector and GenEval's rules: ground-truth renders pass, wrong renders fail the matching task."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lens_jax.data import shapes
from lens_jax.eval import tasks
from lens_jax.eval import (TASKS, check, detect, evaluate, ground_truth_generate_fn, make_eval_items,
                           render_ground_truth, score_image, summarize)

DEMO = shapes.ShapesConfig(max_groups=2, count_prob=0.0, text_prob=0.0, sizes=("medium", "large"))
PER_TASK = 50
# (resolution, scene config): the caption ablation's 64x64 with the default world (small sizes too),
# and the demo's 32x32 with its medium/large sizes.
SETTINGS = {"64_default": (64, None), "32_demo": (32, DEMO)}


@pytest.fixture(scope="module", params=list(SETTINGS))
def setting(request):
    res, cfg = SETTINGS[request.param]
    items = make_eval_items(PER_TASK, seed=0, scene_config=cfg)
    return request.param, res, cfg, items


def _pass_rate(images, items):
    return float(np.mean([score_image(im, it)[0] for im, it in zip(images, items)]))


def _render(scene, res):
    return shapes.render(scene, res, res)


def test_ground_truth_renders_pass_every_task(setting):
    name, res, cfg, items = setting
    results = evaluate(ground_truth_generate_fn(items, res, res), items, width=res, height=res)
    summary = summarize(results, cfg)
    assert summary["n"] == PER_TASK * len(TASKS) and set(summary["tasks"]) == set(TASKS)
    for task, score in summary["tasks"].items():
        assert score >= 0.98, (name, task, score, [r["reason"] for r in results if not r["passed"]])
    assert summary["overall"] >= 0.99


def test_detector_finds_every_object_of_a_ground_truth_render(setting):
    name, res, cfg, items = setting
    for it in items[::7]:
        dets = detect(_render(it.scene, res))
        assert len(dets) == len(it.scene.objects)
        for o in it.scene.objects:
            d = min(dets, key=lambda d: (d.center[0] - o.x) ** 2 + (d.center[1] - o.y) ** 2)
            assert (d.shape, d.color) == (o.shape, o.color)
            x0, y0, x1, y1 = shapes.bbox(o, res, res)
            assert np.allclose(d.box, (x0, y0, x1, y1), atol=1.5 / res)
            assert np.allclose(d.center, ((x0 + x1) / 2, (y0 + y1) / 2), atol=1.0 / res)
            assert 0.75 < d.score <= 1.0


def _replace(scene, objects):
    return dataclasses.replace(scene, objects=tuple(objects))


def _other_color(scene, color, cfg):
    return next(c for c in tasks._colors_on(cfg or shapes.DEFAULT_CONFIG, scene.background) if c != color)


def test_wrong_renders_fail_the_matching_task(setting):
    name, res, cfg, items = setting
    by_task = {t: [it for it in items if it.task == t] for t in TASKS}
    world = cfg or shapes.DEFAULT_CONFIG
    rng = np.random.default_rng(0)
    cases = {}
    # single_object: a different shape.
    cases["single_object: other shape"] = [
        (_replace(it.scene, [dataclasses.replace(it.scene.objects[0], shape=next(
            s for s in shapes.SHAPES if s != it.scene.objects[0].shape))]), it) for it in by_task["single_object"]]
    # two_objects: one of the two missing.
    cases["two_objects: one missing"] = [(_replace(it.scene, it.scene.objects[:1]), it) for it in by_task["two_objects"]]
    # counting: one copy too many, one too few.
    extra = []
    for it in by_task["counting"]:
        o = it.scene.objects[0]
        n = len(it.scene.objects) + 1
        pos = tasks._layout(rng, [(o.shape, o.size)] * n, world)
        extra.append((_replace(it.scene, [dataclasses.replace(o, x=x, y=y) for x, y in pos]), it))
    cases["counting: extra copy"] = extra
    cases["counting: missing copy"] = [(_replace(it.scene, it.scene.objects[:-1]), it) for it in by_task["counting"]]
    # colors: the object in another colour.
    cases["colors: other colour"] = [
        (_replace(it.scene, [dataclasses.replace(it.scene.objects[0], color=_other_color(
            it.scene, it.scene.objects[0].color, cfg))]), it) for it in by_task["colors"]]
    # position: the two objects swapped.
    swapped = []
    for it in by_task["position"]:
        a, b = it.scene.objects
        swapped.append((_replace(it.scene, [dataclasses.replace(a, x=b.x, y=b.y), dataclasses.replace(b, x=a.x, y=a.y)]), it))
    cases["position: swapped"] = swapped
    # color_attr: colours swapped between the shapes (binding), or one colour changed.
    cases["color_attr: colours swapped"] = [
        (_replace(it.scene, [dataclasses.replace(it.scene.objects[0], color=it.scene.objects[1].color),
                             dataclasses.replace(it.scene.objects[1], color=it.scene.objects[0].color)]), it)
        for it in by_task["color_attr"]]
    changed = []
    for it in by_task["color_attr"]:
        a, b = it.scene.objects
        new = next(c for c in tasks._colors_on(world, it.scene.background) if c not in (a.color, b.color))
        changed.append((_replace(it.scene, [a, dataclasses.replace(b, color=new)]), it))
    cases["color_attr: one colour changed"] = changed

    for case, pairs in cases.items():
        rate = _pass_rate([_render(s, res) for s, _ in pairs], [it for _, it in pairs])
        assert rate <= 0.02, (name, case, rate)
    # The changed colour also fails the single-colour check that a colors item would make of it, while the
    # shape-only tasks do not care about colour.
    recolored = [_render(s, res) for s, _ in cases["colors: other colour"]]
    shape_only = [dataclasses.replace(it, spec={"tag": "single_object", "include": [
        {"class": it.scene.objects[0].shape, "count": 1}], "exclude": []}) for it in by_task["colors"]]
    assert _pass_rate(recolored, shape_only) >= 0.98


def test_blank_backgrounds_score_zero():
    items = make_eval_items(10, seed=4)

    def blank(prompts, seeds):
        return np.broadcast_to(np.array(shapes.BACKGROUNDS["gray"], np.uint8), (len(prompts), 64, 64, 3)).copy()

    results = evaluate(blank, items, width=64, height=64)
    s = summarize(results)
    assert s["overall"] == 0.0 and all(v == 0.0 for v in s["tasks"].values())
    assert all(r["detections"] == [] and r["reason"].startswith("expected") for r in results)
    noise = lambda p, s: np.random.default_rng(0).integers(0, 256, (len(p), 64, 64, 3), dtype=np.uint8)
    assert summarize(evaluate(noise, items, width=64, height=64))["overall"] <= 0.1


def test_runner_results_seeds_and_styles():
    items = make_eval_items(3, seed=1)
    seen = []

    def fake(prompts, seeds):
        seen.append((list(prompts), list(seeds)))
        return ground_truth_generate_fn(items, 64, 64, "dense", images_per_prompt=2, seed=10)(prompts, seeds)

    results = evaluate(fake, items, width=64, height=64, prompt_style="dense", images_per_prompt=2, seed=10)
    assert len(results) == 2 * len(items) and all(r["passed"] for r in results)
    prompts, seeds = seen[0]
    assert seeds == list(range(10, 10 + 2 * len(items)))
    assert prompts == [it.dense_prompt for it in items for _ in range(2)]
    r = results[3]
    assert (r["uid"], r["item"], r["image_index"], r["seed"], r["prompt_style"]) == (items[1].uid, 1, 1, 13, "dense")
    assert {"passed", "reason", "spec", "detections", "task", "prompt"} <= set(r)
    s = summarize(results)
    assert s["overall"] == 1.0 and s["n"] == len(results) and s["n_per_task"]["counting"] == 6
    with pytest.raises(ValueError, match="shape"):
        evaluate(lambda p, s: np.zeros((len(p), 32, 32, 3), np.uint8), items, width=64, height=64)
    with pytest.raises(ValueError, match="prompt_style"):
        evaluate(fake, items, width=64, height=64, prompt_style="long")
    gt = render_ground_truth(items, 48, 32)
    assert gt.shape == (len(items), 32, 48, 3) and gt.dtype == np.uint8


def test_check_follows_genevals_rules():
    def det(shape, color, box, score=0.9):
        return dataclasses.replace(_DET, shape=shape, color=color, box=box,
                                   center=((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), score=score)

    a, b = det("circle", "red", (0.1, 0.4, 0.3, 0.6)), det("square", "blue", (0.6, 0.4, 0.8, 0.6))
    pos = {"tag": "position", "include": [{"class": "square", "count": 1},
                                          {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    assert check(pos, [a, b]) == (True, "")
    ok, why = check({**pos, "include": [pos["include"][0], {**pos["include"][1], "position": ["above", 0]}]}, [a, b])
    assert not ok and "expected circle above target, found left of" in why
    count = {"tag": "counting", "include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3}]}
    assert check(count, [a, a])[0] and not check(count, [a])[0] and not check(count, [a, a, a])[0]
    assert check(count, [a, a, det("circle", "red", a.box, score=0.4)])[0]  # below the counting threshold
    assert not check(count, [a, det("circle", "red", a.box, score=0.4)])[0]
    col = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]}
    assert check(col, [a])[0]
    ok, why = check(col, [dataclasses.replace(a, color="pink")])
    assert not ok and "expected red circle>=1, found 0 red" in why
    # GenEval checks the best-scoring detection of the class.
    assert not check(col, [dataclasses.replace(a, color="pink", score=0.95), a])[0]
    assert not check(col, [det("circle", "red", a.box, score=0.2)])[0]  # below the detection threshold


_DET = detect(shapes.render(shapes.Scene("gray", (shapes.ShapeObject("circle", "red", "large", 0.5, 0.5, 0),)), 64, 64))[0]
