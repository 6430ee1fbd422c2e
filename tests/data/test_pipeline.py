"""The TFDS shapes build, generic TFDS sources and the Grain training pipeline (small data in tmp)."""

import collections
import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from lens_jax.data import buckets
from lens_jax.data import pipeline
from lens_jax.data import shapes
from lens_jax.data import tfds_shapes
from lens_jax.data import tokenizer as tok_lib

SEED = 3
NUM_TRAIN = 60
NUM_EVAL = 6
RENDER = "32x32,64x32,32x64"
BUCKETS = "32x32,64x32,32x64"


@pytest.fixture(scope="module")
def tokenizer():
    return tok_lib.build_word_tokenizer()


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shapes"
    return tfds_shapes.ensure_shapes_dataset(root, num_train=NUM_TRAIN, num_eval=NUM_EVAL, seed=SEED,
                                             render_sizes=RENDER)


def make_cfg(shapes_dir, **overrides):
    cfg = pipeline.default_data_config()
    cfg.update(dict(dir=str(shapes_dir), num_train=NUM_TRAIN, num_eval=NUM_EVAL, dataset_seed=SEED,
                    render_sizes=RENDER, buckets=BUCKETS, max_text_len=160, worker_threads=0,
                    prefetch=0))
    cfg.update(overrides)
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def digest(img):
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


def png(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- TFDS


def test_tfds_round_trip(shapes_dir):
    sizes = buckets.parse_sizes(RENDER)
    for split, n, stream in (("train", NUM_TRAIN, 0), ("eval", NUM_EVAL, 1)):
        src = tfds_shapes.open_source(shapes_dir, split)
        assert len(src) == n
        table = tfds_shapes.record_sizes(src, split)
        for i in range(n):
            rec = src[i]
            assert int(rec["index"]) == i
            scene = shapes.sample_scene(SEED, i, stream=stream)
            w, h = sizes[i % len(sizes)]
            assert (int(rec["width"]), int(rec["height"])) == (w, h) == tuple(table[i])
            img = np.asarray(Image.open(io.BytesIO(rec["image"])))
            assert np.array_equal(img, shapes.render(scene, w, h))
            assert rec["dense_caption"].decode() == shapes.dense_caption(scene)
            assert rec["short_caption"].decode() == shapes.short_caption(scene)
            assert json.loads(rec["ground_truth"]) == shapes.ground_truth(scene, w, h)
            assert buckets.assign_bucket(w, h, buckets.parse_sizes(BUCKETS)) == i % len(sizes)
    # The sizes read from the records (no sidecar) agree with the sidecar.
    src = tfds_shapes.open_source(shapes_dir, "train")

    class NoSidecar:
        def __len__(self):
            return len(src)

        def __getitem__(self, i):
            return src[i]

    assert np.array_equal(tfds_shapes.record_sizes(NoSidecar()), tfds_shapes.record_sizes(src, "train"))


def test_ensure_is_idempotent_and_atomic(tmp_path, shapes_dir):
    params_file = os.path.join(shapes_dir, tfds_shapes.PARAMS_FILE)
    mtime = os.path.getmtime(params_file)
    again = tfds_shapes.ensure_shapes_dataset(shapes_dir, num_train=NUM_TRAIN, num_eval=NUM_EVAL,
                                              seed=SEED, render_sizes=RENDER)
    assert again == str(shapes_dir) and os.path.getmtime(params_file) == mtime  # reused

    root = tmp_path / "small"
    tfds_shapes.ensure_shapes_dataset(root, num_train=4, num_eval=2, seed=0)
    assert len(tfds_shapes.open_source(root, "train")) == 4
    tfds_shapes.ensure_shapes_dataset(root, num_train=5, num_eval=2, seed=0)  # other params: rebuilt
    assert len(tfds_shapes.open_source(root, "train")) == 5
    left = [f for f in os.listdir(tmp_path) if not f.endswith(".lock")]
    assert left == ["small"]  # no temp or old directories left behind

    other = tmp_path / "not_shapes"
    other.mkdir()
    (other / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="data.dir"):
        tfds_shapes.ensure_shapes_dataset(other, num_train=4, num_eval=2)
    assert (other / "keep.txt").exists()


def test_parallel_build_matches_serial_build(tmp_path, shapes_dir):
    root = tfds_shapes.ensure_shapes_dataset(tmp_path / "par", num_train=NUM_TRAIN, num_eval=NUM_EVAL,
                                             seed=SEED, render_sizes=RENDER, num_workers=2)
    for split in ("train", "eval"):
        a, b = tfds_shapes.open_source(root, split), tfds_shapes.open_source(shapes_dir, split)
        assert len(a) == len(b)
        for i in range(len(a)):
            assert a[i] == b[i]


def test_generic_tfds_source(tmp_path):
    imgs = [shapes.render(shapes.sample_scene(0, i), 32, 32) for i in range(3)]
    recs = [{"image": png(im), "width": 32, "height": 32, "dense_caption": f"a red circle {i}",
             "short_caption": "red", "ground_truth": {"i": i}, "index": i} for i, im in enumerate(imgs)]
    bdir = tfds_shapes.write_tfds_dataset(tmp_path, {"train": recs, "eval": recs[:1]})
    for src in (tfds_shapes.open_tfds_source(bdir, "train"),
                tfds_shapes.open_tfds_source(tfds_shapes.RECORDS_NAME, "train", data_dir=tmp_path)):
        assert len(src) == 3
        for i in range(3):
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(src[i]["image"]))), imgs[i])
            assert src[i]["dense_caption"].decode() == f"a red circle {i}"
            assert json.loads(src[i]["ground_truth"]) == {"i": i}


# ----------------------------------------------------------------------------------------- pipeline


def test_batches_have_bucket_shapes_and_dtypes(shapes_dir, tokenizer):
    cfg = make_cfg(shapes_dir, worker_threads=2, prefetch=2)
    it = iter(pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=8, seed=0))
    seen = set()
    for batch in take(it, 9):
        assert set(batch) == {"images", "text_ids", "text_mask", "valid"}
        b, h, w, c = batch["images"].shape
        assert (b, c) == (8, 3) and (w, h) in buckets.parse_sizes(BUCKETS)
        seen.add((w, h))
        assert batch["images"].dtype == np.uint8
        assert batch["text_ids"].dtype == np.int32 and batch["text_ids"].shape == (8, 160)
        assert batch["text_mask"].dtype == bool and batch["text_mask"].shape == (8, 160)
        assert batch["valid"].dtype == np.float32 and batch["valid"].shape == (8,)
        assert (batch["valid"] == 1).all()
        n = batch["text_mask"].sum(1)
        assert (n >= 60).all()  # dense captions
        assert (batch["text_ids"][~batch["text_mask"]] == 0).all()
        assert np.array_equal(batch["text_mask"], np.arange(160)[None] < n[:, None])  # right padded
        assert (batch["images"].reshape(8, -1).std(1) > 0).all()
    assert len(seen) == 3


def test_bucket_mixing_follows_weights(shapes_dir, tokenizer):
    cfg = make_cfg(shapes_dir, bucket_weights="2,1,1")
    it = iter(pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=2, seed=0))
    counts = collections.Counter(b["images"].shape[1:3] for b in take(it, 40))
    # (H, W): 32x32 -> (32, 32); 64x32 (W x H) -> (32, 64); 32x64 -> (64, 32)
    assert abs(counts[(32, 32)] - 20) <= 1 and abs(counts[(32, 64)] - 10) <= 1
    assert abs(counts[(64, 32)] - 10) <= 1
    # A zero weight switches a bucket off.
    cfg = make_cfg(shapes_dir, bucket_weights="0,1,0")
    it = iter(pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=2, seed=0))
    assert {b["images"].shape[1:3] for b in take(it, 6)} == {(32, 64)}


@pytest.mark.parametrize("threads", [0, 2])
def test_resume_from_state(shapes_dir, tokenizer, threads):
    cfg = make_cfg(shapes_dir, caption="mix", worker_threads=threads, prefetch=3 if threads else 0)
    ds = pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=4, seed=7)
    it = iter(ds)
    take(it, 5)
    state = it.get_state()
    json.dumps(state)  # small JSON, stored with the checkpoint
    expected = take(it, 6)
    fresh = iter(pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=4, seed=7))
    fresh.set_state(state)
    got = take(fresh, 6)
    for a, b in zip(expected, got):
        for k in a:
            assert np.array_equal(a[k], b[k]), k
    # And a different seed gives a different order.
    other = take(iter(pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=4, seed=8)), 3)
    first = take(iter(ds), 3)
    assert any(not np.array_equal(a["images"], b["images"]) for a, b in zip(first, other))


def test_epochs_cover_the_bucket_and_reshuffle(shapes_dir, tokenizer):
    cfg = make_cfg(shapes_dir, bucket_weights="1,0,0", caption="short")
    it = iter(pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=4, seed=1))
    batches = take(it, 10)  # 20 records in the bucket: two epochs
    imgs = [digest(im) for b in batches for im in b["images"]]
    src = tfds_shapes.open_source(shapes_dir, "train")
    bucket0 = {digest(np.asarray(Image.open(io.BytesIO(src[i]["image"])))) for i in range(0, NUM_TRAIN, 3)}
    assert set(imgs[:20]) == bucket0 and set(imgs[20:]) == bucket0
    assert imgs[:20] != imgs[20:]  # reshuffled each epoch


def test_process_slices_are_disjoint_and_cover(shapes_dir, tokenizer):
    src = tfds_shapes.open_source(shapes_dir, "train")
    sizes = tfds_shapes.record_sizes(src, "train")
    bl, w = buckets.parse_sizes(BUCKETS), [1.0, 1.0, 1.0]
    parts = dict(pipeline.bucket_slices(sizes, bl, w))
    for b in range(3):
        assert set(parts[b].tolist()) == set(range(b, NUM_TRAIN, 3))
    # The processes' rows, concatenated in process order, are exactly one process's global batches.
    cfg = make_cfg(shapes_dir)
    single = take(iter(pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=6, seed=4)), 5)
    split = [take(iter(pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=6, seed=4,
                                                   process_index=p, process_count=3)), 5) for p in range(3)]
    for k in range(5):
        for key in single[k]:
            np.testing.assert_array_equal(np.concatenate([split[p][k][key] for p in range(3)]), single[k][key])
    # End to end: one epoch of each of two processes, one bucket of 20 records.
    cfg = make_cfg(shapes_dir, bucket_weights="1,0,0")
    seen = []
    for p in range(2):
        it = iter(pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=10, seed=0,
                                              process_index=p, process_count=2))
        got = [digest(im) for b in take(it, 2) for im in b["images"]]
        assert len(set(got)) == 10
        seen.append(set(got))
    assert not (seen[0] & seen[1])
    every = {digest(np.asarray(Image.open(io.BytesIO(src[i]["image"])))) for i in range(0, NUM_TRAIN, 3)}
    assert seen[0] | seen[1] == every


def test_caption_modes(shapes_dir, tokenizer):
    def lengths(**kw):
        cfg = make_cfg(shapes_dir, **kw)
        it = iter(pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=10, seed=2))
        return np.concatenate([b["text_mask"].sum(1) for b in take(it, 6)])

    assert (lengths(caption="short") < 12).all()
    assert (lengths(caption="dense") >= 60).all()
    mixed = lengths(caption="mix", dense_ratio=0.5)
    assert (mixed < 12).sum() > 10 and (mixed >= 60).sum() > 10
    assert np.array_equal(mixed, lengths(caption="mix", dense_ratio=0.5))  # deterministic
    assert (lengths(caption="mix", dense_ratio=0.0) < 12).all()
    assert (lengths(caption="mix", dense_ratio=1.0) >= 60).all()


def test_corrupt_image_and_empty_caption_are_masked(tmp_path, tokenizer):
    recs = []
    for i in range(8):
        img = shapes.render(shapes.sample_scene(1, i), 32, 32)
        recs.append({"image": png(img), "width": 32, "height": 32, "index": i,
                     "dense_caption": shapes.dense_caption(shapes.sample_scene(1, i)),
                     "short_caption": "a shape"})
    recs[2]["image"] = b"\x89PNG\r\n\x1a\nthis is not an image"
    recs[5]["dense_caption"] = ""
    recs[6]["image"] = png(np.zeros((32, 32, 3), np.uint8))[:40]  # truncated PNG
    bdir = tfds_shapes.write_tfds_dataset(tmp_path, {"train": recs})
    cfg = pipeline.default_data_config()
    cfg.update(dict(source="tfds", dir=bdir, buckets="32x32", worker_threads=0, prefetch=0))
    it = iter(pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=4, seed=0))
    batches = take(it, 4)  # two epochs
    valid = np.concatenate([b["valid"] for b in batches])
    images = np.concatenate([b["images"] for b in batches])
    masks = np.concatenate([b["text_mask"] for b in batches])
    assert valid.sum() == 10 and (valid == 0).sum() == 6  # 3 bad records per epoch
    assert (images[valid == 0] == 0).all() and not masks[valid == 0].any()
    assert all(im.std() > 0 for im in images[valid == 1]) and masks[valid == 1].any(1).all()
    # Bad records are exactly records 2, 5, 6: compare against the good ones.
    good = {digest(shapes.render(shapes.sample_scene(1, i), 32, 32)) for i in (0, 1, 3, 4, 7)}
    assert {digest(im) for im in images[valid == 1]} == good
    # With short captions record 5 is fine; the two broken images are still masked.
    cfg.caption = "short"
    it = iter(pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=4, seed=0))
    assert np.concatenate([b["valid"] for b in take(it, 2)]).sum() == 6


def test_make_eval_examples(shapes_dir):
    cfg = make_cfg(shapes_dir)
    ex = pipeline.make_eval_examples(cfg, 3)
    assert len(ex) == 3
    for i, e in enumerate(ex):
        scene = shapes.sample_scene(SEED, i, stream=1)
        assert e["index"] == i and e["scene"] == scene
        assert e["dense_caption"] == shapes.dense_caption(scene)
        assert e["short_caption"] == shapes.short_caption(scene)
        assert e["ground_truth"]["num_objects"] == len(scene.objects)
        assert e["image"].shape == (e["height"], e["width"], 3)
    with pytest.raises(ValueError, match="num_eval"):
        pipeline.make_eval_examples(cfg, NUM_EVAL + 1)


@pytest.mark.parametrize("field, value", [
    ("caption", "long"),
    ("source", "webdataset"),
    ("buckets", "64by64"),
    ("buckets", "64x64,,32x32"),
    ("bucket_weights", "1,2"),
    ("bucket_weights", "x"),
    ("dense_ratio", 1.5),
    ("max_text_len", 0),
    ("render_sizes", "64"),
    ("worker_threads", -1),
    ("num_train", 0),
])
def test_bad_config_names_the_field(shapes_dir, tokenizer, field, value):
    cfg = make_cfg(shapes_dir, **{field: value})
    with pytest.raises(ValueError, match=f"data.{field}"):
        pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=4, seed=0)


def test_bad_arguments_name_the_field(shapes_dir, tokenizer):
    cfg = make_cfg(shapes_dir)
    with pytest.raises(ValueError, match="global_batch_size"):
        pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=10, seed=0, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=4, seed=0, process_index=2,
                                    process_count=2)
    cfg = make_cfg(shapes_dir, source="tfds", dir="", name="")
    with pytest.raises(ValueError, match="data.name"):
        pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="data.scene"):
        pipeline.validate_data_config(dict(make_cfg(shapes_dir).to_dict(), scene={"max_groupz": 2}))
