"""ShapesEval items: deterministic, held out, valid under a scene config, prompts in the vocabulary."""

from __future__ import annotations

import math
import warnings

import pytest

from lens_jax.data import shapes
from lens_jax.data import tokenizer as tok_lib
from lens_jax.eval import tasks
from lens_jax.eval import (TASKS, EvalItem, make_eval_items, relative_position, scene_config_from_dict, summarize,
                           task_notes, unavailable_tasks)

DEMO = shapes.ShapesConfig(max_groups=2, count_prob=0.0, text_prob=0.0, sizes=("medium", "large"))


@pytest.fixture(scope="module")
def items():
    return make_eval_items(60, seed=0)


def test_items_per_task_and_fields(items):
    assert [it.task for it in items] == [t for t in TASKS for _ in range(60)]
    for it in items:
        assert isinstance(it, EvalItem) and it.scene.text is None
        assert it.short_prompt and len(it.short_prompt.split()) < 12
        assert it.dense_prompt == shapes.dense_caption(it.scene)
        assert it.spec["tag"] == it.task and it.spec["include"]
        assert EvalItem.from_dict(it.to_dict()) == it
    assert len({it.uid for it in items}) == len(items)


def test_scene_matches_the_spec(items):
    for it in items:
        objs = it.scene.objects
        inc = it.spec["include"]
        if it.task in ("single_object", "colors"):
            assert len(objs) == 1 and inc[0]["class"] == objs[0].shape
            assert ("color" in inc[0]) == (it.task == "colors")
            if it.task == "colors":
                assert inc[0]["color"] == objs[0].color and objs[0].color in it.short_prompt
        elif it.task == "counting":
            n = inc[0]["count"]
            assert 2 <= n <= 4 and len(objs) == n and len({(o.shape, o.color, o.size) for o in objs}) == 1
            assert it.spec["exclude"] == [{"class": objs[0].shape, "count": n + 1}]
            assert it.short_prompt.startswith(shapes._num(n) + " ")
        else:
            assert len(objs) == 2 and objs[0].shape != objs[1].shape
            assert {r["class"] for r in inc} == {o.shape for o in objs}
            if it.task == "color_attr":
                assert objs[0].color != objs[1].color
                assert {(r["class"], r["color"]) for r in inc} == {(o.shape, o.color) for o in objs}
            if it.task == "position":
                rel, g = inc[1]["position"]
                a, b = objs  # the prompt says: a <rel> b
                assert inc[1]["class"] == a.shape and inc[g]["class"] == b.shape
                assert f" {rel} " in it.short_prompt
                for w, h in ((64, 64), (32, 32)):
                    assert rel in relative_position(shapes.bbox(a, w, h), shapes.bbox(b, w, h))
    # Balanced designs: every shape in single_object, every colour in colors, every relation and count.
    assert {it.scene.objects[0].shape for it in items if it.task == "single_object"} == set(shapes.SHAPES)
    assert {it.scene.objects[0].color for it in items if it.task == "colors"} == set(shapes.COLORS)
    assert {it.spec["include"][1]["position"][0] for it in items if it.task == "position"} == set(tasks.RELATIONS)
    assert {len(it.scene.objects) for it in items if it.task == "counting"} == {2, 3, 4}


def test_layout_inside_canvas_separated_and_contrasting(items):
    for it in items:
        objs = it.scene.objects
        assert len({o.cell for o in objs}) == len(objs)
        for o in objs:
            x0, y0, x1, y1 = shapes.bbox(o, 32, 32)
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            assert shapes._COLOR_OK[o.color, it.scene.background]
        for i, a in enumerate(objs):
            for b in objs[:i]:
                reach = tasks._reach(a.shape, a.size) + tasks._reach(b.shape, b.size)
                assert math.dist((a.x, a.y), (b.x, b.y)) >= reach + tasks.MIN_GAP - 1e-3


def test_prompt_words_are_in_the_vocabulary():
    vocab = set(shapes.VOCABULARY)
    tok = tok_lib.build_word_tokenizer()
    for cfg in (None, DEMO):
        for named in (True, False):
            its = make_eval_items(25, seed=1, scene_config=cfg, colors_in_prompts=named)
            prompts = [it.short_prompt for it in its] + [it.dense_prompt for it in its]
            for p in prompts:
                missing = set(shapes._tokens(p)) - vocab
                assert not missing, (p, missing)
            ids, _ = tok_lib.tokenize(tok, prompts, 200)
            assert not (ids == tok.unk_token_id).any()


def test_checked_only_prompts_name_colors_only_where_checked():
    for it in make_eval_items(10, seed=2, colors_in_prompts=False):
        named = any(c in it.short_prompt.split() for c in shapes.COLORS)
        assert named == (it.task in ("colors", "color_attr")), it.short_prompt


def test_deterministic_and_seeded():
    a, b = make_eval_items(8, seed=5), make_eval_items(8, seed=5)
    assert a == b
    c = make_eval_items(8, seed=6)
    assert all(x.scene != y.scene for x, y in zip(a, c))
    assert tasks.make_item("position", 3, seed=5) == a[TASKS.index("position") * 8 + 3]


def test_held_out_from_train_and_eval_streams(items):
    assert tasks.EVAL_STREAM not in (0, 1)
    stream_scenes = {(s.background, s.objects) for stream in (0, 1)
                     for s in (shapes.sample_scene(0, i, stream=stream) for i in range(2000))}
    for it in items:
        assert (it.scene.background, it.scene.objects) not in stream_scenes
    # The items' rng keys are their own: [seed, EVAL_STREAM, task, k] vs [seed, stream, index].
    assert tasks._item_rng(0, "counting", 1).random() != shapes.scene_rng(0, 1, 0).random()


def test_demo_scene_config_is_respected_and_counting_is_noted():
    its = make_eval_items(30, seed=0, scene_config=DEMO)
    assert {it.task for it in its} == set(TASKS)
    assert {o.size for it in its for o in it.scene.objects} == {"medium", "large"}
    notes = task_notes(DEMO)
    assert set(notes) == {"counting"} and "out of distribution" in notes["counting"]
    s = summarize([{"task": t, "passed": True} for t in TASKS], DEMO)
    assert s["skipped"] == {} and set(s["notes"]) == {"counting"}


def test_impossible_tasks_are_skipped_and_reported():
    one_shape = shapes.ShapesConfig(shapes=("circle",), colors=("red",))
    skip = unavailable_tasks(one_shape)
    assert set(skip) == {"two_objects", "position", "color_attr"}
    with pytest.warns(UserWarning) as rec:
        its = make_eval_items(4, scene_config=one_shape)
    assert sorted(str(w.message).split(":")[1] for w in rec) == [f" skipping task {t}" for t in sorted(skip)]
    assert {it.task for it in its} == {"single_object", "counting", "colors"}
    s = summarize([{"task": it.task, "passed": True} for it in its], one_shape)
    assert set(s["skipped"]) == set(skip) and "two shapes" in s["skipped"]["position"]
    assert s["overall"] == 1.0 and s["n"] == 12

    no_counts = shapes.ShapesConfig(max_count=1)
    assert set(unavailable_tasks(no_counts)) == {"counting"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "counting" not in {it.task for it in make_eval_items(2, scene_config=no_counts)}
    assert set(unavailable_tasks(shapes.ShapesConfig(colors=("red",)))) == {"color_attr"}
    three = shapes.ShapesConfig(max_count=3)
    assert {len(it.scene.objects) for it in make_eval_items(9, scene_config=three, tasks=("counting",))} == {2, 3}
    with pytest.raises(ValueError, match="impossible"):
        tasks.make_item("color_attr", 0, scene_config=shapes.ShapesConfig(colors=("red",)))


def test_scene_config_from_dict():
    assert scene_config_from_dict(None) is None and scene_config_from_dict({}) is None
    cfg = scene_config_from_dict({"sizes": ["medium", "large"], "count_prob": 0.0})
    assert cfg.sizes == ("medium", "large") and cfg.count_prob == 0.0


def test_relative_position_is_genevals_rule():
    left, right = (0.1, 0.4, 0.3, 0.6), (0.6, 0.4, 0.8, 0.6)
    assert relative_position(left, right) == {"left of"}
    assert relative_position(right, left) == {"right of"}
    top, bottom = (0.4, 0.1, 0.6, 0.3), (0.4, 0.6, 0.6, 0.8)
    assert relative_position(top, bottom) == {"above"}
    assert relative_position((0.1, 0.1, 0.3, 0.3), (0.6, 0.6, 0.8, 0.8)) == {"left of", "above"}
    # Centres closer than 0.1 x the summed sizes: no relation.
    assert relative_position((0.1, 0.1, 0.5, 0.5), (0.15, 0.1, 0.55, 0.5)) == set()
    # Mostly vertical offset: a small horizontal shift is not "left of".
    assert "left of" not in relative_position((0.4, 0.1, 0.5, 0.2), (0.45, 0.7, 0.55, 0.8))
