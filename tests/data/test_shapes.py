"""Scenes, renders, captions, the word tokenizer and bucket helpers (no datasets on disk here)."""

import json
import math

import numpy as np
import pytest

from lens_jax.data import buckets
from lens_jax.data import shapes
from lens_jax.data import tokenizer as tok_lib

N_SCENES = 400


@pytest.fixture(scope="module")
def tokenizer():
    return tok_lib.build_word_tokenizer()


@pytest.fixture(scope="module")
def scenes():
    return [shapes.sample_scene(11, i) for i in range(N_SCENES)]


# ------------------------------------------------------------------------------------------ scenes


def test_scenes_and_captions_are_deterministic():
    for i in range(20):
        a, b = shapes.sample_scene(3, i), shapes.sample_scene(3, i)
        assert a == b
        assert shapes.dense_caption(a) == shapes.dense_caption(b)
        assert shapes.short_caption(a) == shapes.short_caption(b)
        assert np.array_equal(shapes.render(a, 64, 64), shapes.render(b, 64, 64))
        assert shapes.make_record(3, i, 0, 64, 64) == shapes.make_record(3, i, 0, 64, 64)
    # Different indices, seeds and streams give different scenes.
    assert len({shapes.sample_scene(3, i) for i in range(50)}) > 45
    assert shapes.sample_scene(3, 0) != shapes.sample_scene(4, 0)
    assert shapes.sample_scene(3, 0) != shapes.sample_scene(3, 0, stream=1)
    # An explicit rng works too and is deterministic in its state.
    assert shapes.sample_scene(np.random.default_rng(5)) == shapes.sample_scene(np.random.default_rng(5))


def test_default_scenes_are_simple(scenes):
    for s in scenes:
        assert 1 <= len(s.groups) <= 3
        assert 1 <= len(s.objects) <= shapes.DEFAULT_CONFIG.max_objects
        kinds = [(g.shape, g.color) for g in s.groups]
        assert len(set(kinds)) == len(kinds)  # groups are distinct colour+shape kinds
        assert all(g.count <= shapes.DEFAULT_CONFIG.max_count for g in s.groups)
        cells = [o.cell for o in s.objects] + ([shapes._cell(s.text.x, s.text.y)] if s.text else [])
        assert len(set(cells)) == len(cells)  # one object per grid cell
    counts = {len(s.objects) for s in scenes}
    assert {1, 2, 3, 4} <= counts  # counting scenes exist
    assert any(s.text is not None for s in scenes) and any(s.text is None for s in scenes)


def test_scene_config_is_respected():
    cfg = shapes.ShapesConfig(min_groups=2, max_groups=2, count_prob=0.0, text_prob=0.0,
                              shapes=("circle", "square"), colors=("red", "blue"))
    for i in range(30):
        s = shapes.sample_scene(0, i, config=cfg)
        assert len(s.objects) == 2 and s.text is None
        assert {o.shape for o in s.objects} <= {"circle", "square"}
        assert {o.color for o in s.objects} <= {"red", "blue"}
    with pytest.raises(ValueError, match="colors"):
        shapes.sample_scene(0, 0, config=shapes.ShapesConfig(colors=("mauve",)))


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (128, 64), (64, 128)])
def test_objects_inside_canvas_and_not_overlapping(scenes, size):
    w, h = size
    for s in scenes[:150]:
        boxes = [shapes.bbox(o, w, h) for o in s.objects]
        for x0, y0, x1, y1 in boxes:
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
        m = min(w, h)
        for i, a in enumerate(s.objects):
            for b in s.objects[:i]:
                dist = math.hypot((a.x - b.x) * w, (a.y - b.y) * h)
                reach = (a.radius * shapes._EXTENT[a.shape] + b.radius * shapes._EXTENT[b.shape]) * m
                assert dist >= reach


# ------------------------------------------------------------------------------------------ render


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (128, 64), (64, 128)])
def test_render_size_and_object_colours(scenes, size):
    w, h = size
    for s in scenes[:60]:
        img = shapes.render(s, w, h)
        assert img.shape == (h, w, 3) and img.dtype == np.uint8
        for o in s.objects:
            # The centre pixel of every object has the object's colour.
            px = img[min(h - 1, int(o.y * h)), min(w - 1, int(o.x * w))].astype(int)
            assert np.abs(px - np.array(shapes.COLORS[o.color])).max() <= 40, (o, px)
            # And that colour covers a sensible area: at least a small disc of it.
            mask = (np.abs(img.astype(int) - np.array(shapes.COLORS[o.color])).max(-1) <= 10)
            assert mask.sum() >= 0.5 * math.pi * (o.radius * min(w, h) * 0.7) ** 2
        bg = np.array(shapes.BACKGROUNDS[s.background])
        assert (np.abs(img[0, 0].astype(int) - bg).max() <= 10) or len(s.objects) > 0


def test_render_text_marks_its_cell():
    s = next(sc for sc in (shapes.sample_scene(2, i) for i in range(200)) if sc.text is not None)
    img = shapes.render(s, 96, 96).astype(int)
    tc = np.array(shapes.TEXT_COLORS[s.text.color])
    cx, cy = int(s.text.x * 96), int(s.text.y * 96)
    patch = img[cy - 12:cy + 12, cx - 16:cx + 16]
    assert (np.abs(patch - tc).max(-1) <= 60).sum() > 5


# ----------------------------------------------------------------------------------------- captions


def test_caption_lengths(scenes):
    dense = [len(shapes.dense_caption(s).split()) for s in scenes]
    short = [len(shapes.short_caption(s).split()) for s in scenes]
    assert min(dense) >= 60 and max(dense) <= 120, (min(dense), max(dense))
    assert max(short) < 10 and min(short) >= 1
    assert len({shapes.dense_caption(s).split(".")[0] for s in scenes[:50]}) > 20  # varied


def test_captions_use_vocabulary_and_tokenize_without_unk(scenes, tokenizer):
    vocab = set(shapes.VOCABULARY)
    assert shapes.VOCABULARY == sorted(vocab)
    texts = []
    for s in scenes:
        for text in (shapes.dense_caption(s), shapes.short_caption(s)):
            words = shapes._tokens(text)
            missing = [w for w in words if w not in vocab]
            assert not missing, (missing, text)
            texts.append(text)
    texts.append("a red circle on the left and a blue square on the right")
    ids, mask = tok_lib.tokenize(tokenizer, texts, 200)
    assert not (ids[mask] == tokenizer.unk_token_id).any()
    n_dense = mask[0:len(scenes) * 2:2].sum(1)
    assert n_dense.min() >= 60 and n_dense.max() <= 128  # ~1 token per word (+ punctuation)


def test_dense_caption_mentions_everything(scenes):
    for s in scenes[:200]:
        text = shapes.dense_caption(s)
        assert s.background in text
        for g in s.groups:
            noun = g.shape if g.count == 1 else shapes._PLURAL[g.shape]
            assert f"{g.color} {noun}" in text or f"{shapes._SIZE_ADJ[g.size]} {g.color} {noun}" in text
            assert shapes._SIZE_ADJ[g.size] in text
            if g.count > 1:
                assert shapes._num(g.count) in text
        if s.text is not None:
            assert f'"{s.text.word.upper()}"' in text
        for o in s.objects:  # absolute layout: some phrase of the object's region
            assert any(p in text for p in shapes._REGION_PHRASES[o.region])


def test_dense_caption_relations_are_true():
    found = 0
    for i in range(200):
        s = shapes.sample_scene(5, i)
        singles = {f"{g.color} {g.shape}": g.objects[0] for g in s.groups if g.count == 1}
        for sentence in shapes.dense_caption(s).split(". "):
            for rel in ("to the left of", "to the right of", "above", "below"):
                if f" {rel} the " not in sentence or not sentence.startswith("the "):
                    continue
                a = next((k for k in singles if sentence.startswith(f"the {k} ")), None)
                b = next((k for k in singles if sentence.rstrip(".").endswith(f"the {k}")), None)
                if a is None or b is None:
                    continue
                (ac, ar), (bc, br) = singles[a].cell, singles[b].cell
                ok = {"to the left of": ac < bc, "to the right of": ac > bc, "above": ar < br,
                      "below": ar > br}[rel]
                assert ok, sentence
                found += 1
    assert found > 20


def test_ground_truth_is_json_and_rebuilds_the_scene(scenes):
    for s in scenes[:100]:
        gt = shapes.ground_truth(s, 128, 64)
        back = json.loads(json.dumps(gt))
        assert back["num_objects"] == len(s.objects)
        assert sum(g["count"] for g in back["groups"]) == len(s.objects)
        assert all(len(o["bbox"]) == 4 for o in back["objects"])
        assert shapes.scene_from_ground_truth(back) == s
        for r in back["relations"]:
            a, b = back["objects"][r["subject"]], back["objects"][r["object"]]
            if r["relation"] == "left of":
                assert b["x"] - a["x"] > 0.1  # GenEval's box-centre margin holds
            else:
                assert b["y"] - a["y"] > 0.1


# ---------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_and_roundtrip(tmp_path, tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in tok_lib.SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert len(tokenizer) == len(shapes.VOCABULARY) + 4
    again = tok_lib.build_word_tokenizer()
    assert again.get_vocab() == tokenizer.get_vocab()
    path = tok_lib.save_tokenizer(tokenizer, tmp_path / "tok")
    loaded = tok_lib.load_tokenizer(path)
    texts = ["A Red circle, on the LEFT.", "two blue stars: one at the top", ""]
    a_ids, a_mask = tok_lib.tokenize(tokenizer, texts, 12)
    b_ids, b_mask = tok_lib.tokenize(loaded, texts, 12)
    assert np.array_equal(a_ids, b_ids) and np.array_equal(a_mask, b_mask)
    assert a_ids.dtype == np.int32 and a_mask.dtype == bool and a_ids.shape == (3, 12)
    words = tokenizer.convert_ids_to_tokens(a_ids[0][a_mask[0]].tolist())
    assert words == ["a", "red", "circle", ",", "on", "the", "left", "."]
    assert not a_mask[2].any() and (a_ids[2] == 0).all()
    assert (a_ids[0][~a_mask[0]] == 0).all()  # right padding with <pad> = 0
    # Truncation keeps the first max_len tokens.
    ids, mask = tok_lib.tokenize(tokenizer, texts[:1], 3)
    assert mask.all() and tokenizer.convert_ids_to_tokens(ids[0].tolist()) == ["a", "red", "circle"]
    # Unknown words map to <unk>; special tokens only on request.
    ids, mask = tok_lib.tokenize(tokenizer, ["a zebra"], 5, add_special_tokens=True)
    assert ids[0, :4].tolist() == [2, tokenizer.convert_tokens_to_ids("a"), 1, 3]


# ------------------------------------------------------------------------------------------ buckets


def test_bucket_parsing_and_assignment():
    assert buckets.parse_sizes("64x64, 48x80,80X48") == [(64, 64), (48, 80), (80, 48)]
    for bad in ("", "64", "64x", "64x64,,", "ax4", "0x64", "64x64,64x64"):
        with pytest.raises(ValueError, match="buckets"):
            buckets.parse_sizes(bad)
    assert buckets.parse_weights("1", 3) == [1.0, 1.0, 1.0]
    assert buckets.parse_weights("2,1,1", 3) == [2.0, 1.0, 1.0]
    for bad in ("1,2", "a", "-1", "0,0"):
        with pytest.raises(ValueError, match="bucket_weights"):
            buckets.parse_weights(bad, 3 if bad != "0,0" else 2)
    bl = [(64, 64), (48, 80), (80, 48)]
    assert buckets.assign_bucket(64, 64, bl) == 0
    assert buckets.assign_bucket(200, 210, bl) == 0
    assert buckets.assign_bucket(60, 100, bl) == 1
    assert buckets.assign_bucket(128, 64, bl) == 2
    assert buckets.assign_bucket(30, 100, bl) == 1
    assert buckets.assign_buckets(np.array([64, 60, 128]), np.array([64, 100, 64]), bl).tolist() == [0, 1, 2]


def test_resize_crop():
    img = shapes.render(shapes.sample_scene(0, 1), 128, 64)
    out = buckets.resize_crop(img, (64, 64))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out, buckets.resize_crop(img, (64, 64)))  # deterministic
    assert np.array_equal(buckets.resize_crop(img, (128, 64)), img)  # same size: untouched
    assert buckets.resize_crop(img, (48, 80)).shape == (80, 48, 3)
    # Pure scaling keeps the content: a downscaled render is close to a render at that size.
    small = buckets.resize_crop(img, (64, 32))
    ref = shapes.render(shapes.sample_scene(0, 1), 64, 32)
    assert np.abs(small.astype(int) - ref.astype(int)).mean() < 12
