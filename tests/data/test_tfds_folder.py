"""User datasets through tensorflow-datasets: the image-folder builder, its CLI, foreign TFDS datasets,
and what each process reads (small data in tmp, no TensorFlow)."""

import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from lens_jax.data import build as build_cli
from lens_jax.data import buckets
from lens_jax.data import pipeline
from lens_jax.data import tfds_folder
from lens_jax.data import tfds_shapes
from lens_jax.data import tokenizer as tok_lib

BUCKETS = "48x48,64x32,32x64"
EVAL = 3


@pytest.fixture(scope="module")
def tokenizer():
    return tok_lib.build_word_tokenizer()


def digest(img):
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


def pixels(data):
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def smooth(rng, w, h, channels=3):
    """A smooth random image (JPEG-friendly), uint8 [h, w, channels]."""
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    out = [127 + 120 * np.sin(6.28 * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y) + rng.uniform(0, 6))
           for _ in range(channels)]
    return np.stack(out, -1).astype(np.uint8)


def save(path, arr, fmt, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    im.save(path, format=fmt, **kw)


def caption(i):
    return f"a red circle and a blue square number {i}", f"red circle {i}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An image folder with captions; returns (images_dir, captions_path, expected, bad) where expected
    maps key -> (true RGB pixels or None, (w, h), dense, short, original bytes kept?)."""
    root = tmp_path_factory.mktemp("folder")
    images = root / "images"
    rng = np.random.default_rng(0)
    expected, lines = {}, []

    def add(key, arr, fmt, *, kept=True, pixels_out=None, size=None, **kw):
        save(images / key, arr, fmt, **kw)
        dense, short = caption(len(expected))
        px = pixels_out if pixels_out is not None else np.asarray(Image.open(images / key).convert("RGB"))
        h, w = px.shape[:2]
        expected[key] = {"pixels": px, "size": size or (w, h), "dense": dense, "short": short, "kept": kept}
        lines.append({"key": key, "dense_caption": dense, "short_caption": short, "width": w, "height": h})

    sizes = [(48, 48), (64, 32), (32, 64), (90, 40), (40, 90), (50, 52), (70, 30), (30, 70)]
    for i, (w, h) in enumerate(sizes * 2):
        sub = ["", "a/", "a/b/", "c/"][i % 4]
        ext = ("jpg", "JPEG") if i % 2 else ("png", "PNG")
        add(f"{sub}img{i:02d}.{ext[0]}", smooth(rng, w, h), ext[1])
    add("upper/CAPS.JPG", smooth(rng, 40, 40), "JPEG")
    add("grey.png", smooth(rng, 36, 36, 1)[..., 0], "PNG")
    # Re-encoded: alpha (composited over white), BMP, CMYK JPEG, EXIF-rotated JPEG.
    rgba = smooth(rng, 40, 30, 4)
    rgba[..., 3] = np.where(np.arange(40)[None] < 20, 0, 255)
    white = np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8)
    add("alpha.png", rgba, "PNG", kept=False, pixels_out=white)
    add("old.bmp", smooth(rng, 44, 33), "BMP", kept=False)
    cmyk = Image.fromarray(smooth(rng, 32, 32, 4), "CMYK")
    save(images / "cmyk.jpg", cmyk, "JPEG")
    cmyk_rgb = np.asarray(Image.open(images / "cmyk.jpg").convert("RGB"))
    (images / "cmyk.jpg").unlink()
    add("cmyk.jpg", cmyk, "JPEG", kept=False, pixels_out=cmyk_rgb)
    rot = smooth(rng, 60, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    save(images / "rot.jpg", rot, "JPEG", exif=exif.tobytes())
    rot_disp = np.asarray(Image.open(images / "rot.jpg").convert("RGB"))
    rot_disp = np.rot90(rot_disp, k=-1)
    (images / "rot.jpg").unlink()
    add("rot.jpg", rot, "JPEG", kept=False, pixels_out=rot_disp, size=(30, 60), exif=exif.tobytes())
    # Bad ones: truncated JPEG, garbage PNG, an image without caption, a captioner error, a caption
    # without an image, and an empty caption.
    bad = {}
    save(images / "trunc.jpg", smooth(rng, 64, 64), "JPEG")
    data = (images / "trunc.jpg").read_bytes()
    (images / "trunc.jpg").write_bytes(data[: len(data) // 2])
    lines.append({"file": "trunc.jpg", "caption": "a truncated file"})
    bad["trunc.jpg"] = "unreadable image"
    (images / "a" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    lines.append({"path": "./a/garbage.png", "caption": "garbage"})
    bad["a/garbage.png"] = "unreadable image"
    save(images / "c" / "nocap.png", smooth(rng, 20, 20), "PNG")
    bad["c/nocap.png"] = "no caption"
    save(images / "failed.png", smooth(rng, 20, 20), "PNG")
    lines.append({"key": "failed.png", "error": "timeout after 3 tries"})
    bad["failed.png"] = "captioner error"
    save(images / "empty.png", smooth(rng, 20, 20), "PNG")
    lines.append({"key": "empty.png", "caption": "   "})
    bad["empty.png"] = "empty caption"
    lines.append({"key": "gone/missing.jpg", "caption": "no such file"})
    save(root / "outside.png", smooth(rng, 20, 20), "PNG")  # exists, but not inside the folder
    lines.append({"key": "../outside.png", "caption": "outside"})
    os.symlink(images, images / "a" / "loop")  # a symlink loop: walked once
    (images / "notes.txt").write_text("not an image")
    # A repeated key: the later line wins (a resumed captioner).
    first = lines[0]
    lines.insert(0, dict(first, dense_caption="an outdated caption"))
    path = root / "captions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    return images, path, expected, bad


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
    images, captions, _, _ = folder
    out = tmp_path_factory.mktemp("builds") / "my_set"
    return tfds_folder.build_image_folder_dataset(images, captions, out, eval_count=EVAL, workers=2)


def all_records(out_dir):
    recs = {}
    for split in ("train", "eval"):
        src = tfds_shapes.open_source(out_dir, split)
        sizes = tfds_shapes.record_sizes(src, split)
        for i in range(len(src)):
            rec = src[i]
            key = json.loads(rec["ground_truth"])["key"]
            assert key not in recs, f"{key} twice"
            assert int(rec["index"]) == i and tuple(sizes[i]) == (int(rec["width"]), int(rec["height"]))
            recs[key] = dict(rec, split=split)
    return recs


# ------------------------------------------------------------------------------------------ building


def test_round_trip_every_good_image_once(folder, built):
    images, _, expected, bad = folder
    recs = all_records(built.out_dir)
    assert set(recs) == set(expected)
    bucket_list = buckets.parse_sizes(BUCKETS)
    for key, exp in expected.items():
        rec = recs[key]
        if exp["kept"]:
            assert rec["image"] == (images / key).read_bytes(), key
        else:
            assert rec["image"][:8] == b"\x89PNG\r\n\x1a\n", key
        np.testing.assert_array_equal(pixels(rec["image"]), exp["pixels"], err_msg=key)
        assert (int(rec["width"]), int(rec["height"])) == exp["size"], key
        assert rec["dense_caption"].decode() == exp["dense"] and rec["short_caption"].decode() == exp["short"]
    # Bucketing from the sidecar equals assign_bucket on the true size.
    for split in ("train", "eval"):
        src = tfds_shapes.open_source(built.out_dir, split)
        table = tfds_shapes.record_sizes(src, split)
        parts = dict(pipeline.bucket_slices(table, bucket_list, [1.0] * 3))
        for b, members in parts.items():
            for pos in members:
                key = json.loads(src[int(pos)]["ground_truth"])["key"]
                assert buckets.assign_bucket(*expected[key]["size"], bucket_list) == b
    # Eval: the EVAL keys with the smallest hash, in hash order; train in hash order too.
    good = sorted(expected, key=tfds_folder.key_hash)
    eval_src = tfds_shapes.open_source(built.out_dir, "eval")
    assert [json.loads(eval_src[i]["ground_truth"])["key"] for i in range(EVAL)] == good[:EVAL]
    train_src = tfds_shapes.open_source(built.out_dir, "train")
    assert [json.loads(train_src[i]["ground_truth"])["key"] for i in range(len(train_src))] == good[EVAL:]


def test_report_counts_and_names_skipped_files(folder, built):
    _, _, expected, bad = folder
    rep = json.loads(open(built.report_path).read())
    assert built.report_path == os.path.join(built.out_dir, "build_report.json")
    got = {s["file"]: s["reason"] for s in rep["skipped"]}
    assert set(got) == set(bad)
    for f, reason in bad.items():
        assert got[f].startswith(reason), (f, got[f])
    assert "timeout after 3 tries" in got["failed.png"]
    assert rep["captions_without_image"] == ["../outside.png", "gone/missing.jpg"]
    assert {r["file"] for r in rep["reencoded"]} == {k for k, e in expected.items() if not e["kept"]}
    reasons = {r["file"]: r["reason"] for r in rep["reencoded"]}
    assert "alpha" in reasons["alpha.png"] and "BMP" in reasons["old.bmp"]
    assert "CMYK" in reasons["cmyk.jpg"] and "orientation 6" in reasons["rot.jpg"]
    c = rep["counts"]
    assert c["train"] + c["eval"] == len(expected) and c["eval"] == EVAL
    assert c["skipped"] == len(bad) and c["captions_without_image"] == 2 and c["duplicate_caption_keys"] == 1
    assert c["image_files"] == len(expected) + len(bad)  # every image file, bad ones included
    assert rep["skipped_by_reason"]["unreadable image"] == 2


def test_grain_pipeline_reads_the_build(folder, built, tokenizer):
    _, _, expected, _ = folder
    cfg = pipeline.default_data_config()
    cfg.update(dict(source="tfds", dir=built.out_dir, buckets=BUCKETS, bucket_weights="1,0,0", caption="short",
                    worker_threads=2, prefetch=2, max_text_len=16))
    bucket = (48, 48)
    members = [k for k, e in expected.items() if buckets.assign_bucket(*e["size"], buckets.parse_sizes(BUCKETS)) == 0]
    train_keys = set(all_records(built.out_dir)) - set(sorted(expected, key=tfds_folder.key_hash)[:EVAL])
    members = [k for k in members if k in train_keys]
    assert len(members) >= 4
    it = iter(pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=2, seed=0))
    got = []
    for _ in range(len(members) // 2):
        b = next(it)
        assert b["images"].shape == (2, 48, 48, 3) and (b["valid"] == 1).all() and b["text_mask"].any(1).all()
        got += [digest(im) for im in b["images"]]
    want = {digest(buckets.resize_crop(expected[k]["pixels"], bucket)) for k in members}
    assert set(got) <= want and len(set(got)) == len(got) == 2 * (len(members) // 2)
    # Every bucket trains; eval examples come from the eval split.
    cfg.bucket_weights = "1"
    shapes_seen = {next(it)["images"].shape[1:3] for it in [iter(pipeline.make_train_dataset(
        cfg, tokenizer, global_batch_size=2, seed=1))] for _ in range(12)}
    assert shapes_seen == {(48, 48), (32, 64), (64, 32)}
    ex = pipeline.make_eval_examples(cfg, EVAL)
    for e in ex:
        key = next(k for k, v in expected.items() if v["dense"] == e["dense_caption"])
        np.testing.assert_array_equal(e["image"], expected[key]["pixels"])
        assert (e["width"], e["height"]) == expected[key]["size"] and e["scene"] is None


def test_interrupted_build_never_looks_complete(folder, built, tmp_path, monkeypatch):
    images, captions, expected, _ = folder
    out = tmp_path / "out"
    stale = tmp_path / ".out.building-killed"  # what a killed build leaves
    stale.mkdir()
    (stale / "junk").write_text("x")

    real = tfds_folder.LensImageFolder._generate_examples

    def boom(self, split):  # killed after the first record
        for k, ex in real(self, split):
            yield k, ex
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(tfds_folder.LensImageFolder, "_generate_examples", boom)
        with pytest.raises(KeyboardInterrupt):
            tfds_folder.build_image_folder_dataset(images, captions, out, eval_count=1, workers=1)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []  # stale removed
    # Running it again starts over and completes; building over a build replaces it.
    r = tfds_folder.build_image_folder_dataset(images, captions, out, eval_count=1, workers=1, verify=False,
                                               name="renamed_set")
    assert r.counts["eval"] == 1 and os.path.basename(os.path.dirname(r.builder_dir)) == "renamed_set"
    assert len(tfds_shapes.open_source(out, "eval")) == 1
    # Without verify, the truncated JPEG (readable header) is kept: it is masked during training.
    assert "trunc.jpg" not in {s["file"] for s in r.report["skipped"]}
    assert len(tfds.data_source("renamed_set", split="train", data_dir=str(out))) == len(expected) + 1 - 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["out"]
    # A directory that is not a build is never touched.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="out"):
        tfds_folder.build_image_folder_dataset(images, captions, other, eval_count=1)
    assert (other / "keep.txt").read_text() == "user data"
    with pytest.raises(ValueError, match="eval_count"):
        tfds_folder.build_image_folder_dataset(images, captions, tmp_path / "x", eval_count=len(expected))
    with pytest.raises(ValueError, match="name"):
        tfds_folder.build_image_folder_dataset(images, captions, tmp_path / "x", eval_count=1, name="Bad-Name")


@pytest.mark.parametrize("line, match", [
    ("{not json", r":2: not valid JSON"),
    ('["a.png", "cap"]', r":2: expected a JSON object"),
    ('{"caption": "no file"}', r":2: no image path.*'key'"),
    ('{"key": "a.png"}', r":2: no caption.*'dense_caption'"),
    ('{"key": "a.png", "caption": 3}', r":2: field 'caption' .* must be a string"),
    ('{"key": 7, "caption": "x"}', r":2: field 'key' .* must be a string"),
])
def test_malformed_caption_lines_name_file_line_field(tmp_path, line, match):
    path = tmp_path / "caps.jsonl"
    path.write_text('{"key": "ok.png", "caption": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=str(path) + match):
        tfds_folder.read_captions(path)


def test_txt_sidecar_captions(tmp_path):
    images = tmp_path / "imgs"
    rng = np.random.default_rng(1)
    for i in range(3):
        save(images / f"p{i}.png", smooth(rng, 30, 20), "PNG")
    (images / "p0.txt").write_text("a green triangle\n")
    (images / "p1.txt").write_text("a blue circle")
    r = tfds_folder.build_image_folder_dataset(images, None, tmp_path / "out", eval_count=0)
    assert r.counts["train"] == 2 and r.counts["eval"] == 0
    assert [s["file"] for s in r.report["skipped"]] == ["p2.png"]
    src = tfds_shapes.open_source(r.out_dir, "train")
    assert {src[i]["dense_caption"].decode() for i in range(2)} == {"a green triangle", "a blue circle"}


def test_cli(folder, tmp_path, capsys):
    images, captions, expected, bad = folder
    out = tmp_path / "cli_out"
    rc = build_cli.main(["--images", str(images), "--captions", str(captions), "--out", str(out),
                         "--eval-count", "2", "--buckets", BUCKETS, "--quiet", "--workers", "2"])
    text = capsys.readouterr().out
    assert rc == 0
    assert f"train {len(expected) - 2}, eval 2" in text
    assert f"skipped:   {len(bad)}" in text and "captions without an image: 2" in text
    assert f"--config.data.source=tfds --config.data.dir={out} --config.data.buckets={BUCKETS}" in text
    assert "buckets (train): 48x48:" in text
    # Malformed captions: a clear error, exit status 2, nothing built.
    bad_caps = tmp_path / "bad.jsonl"
    bad_caps.write_text('{"key": "x.png"}\n')
    rc = build_cli.main(["--images", str(images), "--captions", str(bad_caps), "--out", str(tmp_path / "n"),
                         "--quiet"])
    assert rc == 2 and f"{bad_caps}:1: no caption" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()
    # The module runs as a script.
    res = subprocess.run([sys.executable, "-m", "lens_jax.data.build", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "--eval-count" in res.stdout


# ------------------------------------------------------------------------------ foreign TFDS datasets


class ForeignSet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Not our features: a decoded tfds Image, a 'caption' text, a label; no width/height."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None
    _checksums_path = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "caption": tfds.features.Text(),
            "label": tfds.features.ClassLabel(num_classes=2),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train", 8), "validation": self._generate_examples("val", 2)}

    def _generate_examples(self, split, n):
        for i in range(n):
            img = foreign_image(split, i)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            yield i, {"image": buf.getvalue(), "caption": f"{split} red circle {i}", "label": i % 2}


def foreign_image(split, i):
    rng = np.random.default_rng((0 if split == "train" else 1, i))
    w, h = [(48, 48), (64, 32), (32, 64), (50, 47)][i % 4]
    return smooth(rng, w, h)


@pytest.fixture(scope="module")
def foreign_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("foreign")
    builder = ForeignSet(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return str(data_dir), str(builder.data_dir)


def test_foreign_tfds_dataset(foreign_dir, tokenizer, monkeypatch):
    data_dir, bdir = foreign_dir
    cfg = pipeline.default_data_config()
    cfg.update(dict(source="tfds", name="foreign_set", dir=data_dir, buckets=BUCKETS, worker_threads=0,
                    prefetch=0, max_text_len=16))
    src = pipeline.open_split(cfg, "train")
    assert isinstance(src, tfds_folder.MappedSource) and len(src) == 8
    truth = {f"train red circle {i}": foreign_image("train", i) for i in range(8)}
    sizes = tfds_shapes.record_sizes(src, "train")
    for i in range(8):
        rec = src[i]
        img = truth[rec["dense_caption"]]
        assert isinstance(rec["image"], bytes)  # read undecoded: the pipeline decodes (and masks failures)
        np.testing.assert_array_equal(pixels(rec["image"]), img)
        assert tuple(sizes[i]) == (img.shape[1], img.shape[0]) == (rec["width"], rec["height"])
        assert rec["short_caption"] == rec["dense_caption"]
    # The one-time size pass is cached next to the data: a fresh source does not measure again.
    assert os.path.exists(os.path.join(bdir, "lens_sizes-train.npy"))
    monkeypatch.setattr(tfds_folder, "image_size", lambda v: pytest.fail("measured again"))
    np.testing.assert_array_equal(tfds_shapes.record_sizes(pipeline.open_split(cfg, "train")), sizes)
    monkeypatch.undo()
    # Training batches; every record of a bucket in one epoch.
    cfg.bucket_weights = "1,0,0"
    it = iter(pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=2, seed=0))
    got = {digest(im) for _ in range(2) for im in next(it)["images"]}  # 4 records are square-ish
    want = {digest(buckets.resize_crop(img, (48, 48))) for img in truth.values()
            if buckets.assign_bucket(img.shape[1], img.shape[0], buckets.parse_sizes(BUCKETS)) == 0}
    assert got == want and len(want) == 4
    # By directory (no name), and eval examples from its 'validation' split.
    cfg2 = pipeline.default_data_config()
    cfg2.update(dict(source="tfds", dir=bdir, buckets=BUCKETS))
    ex = pipeline.make_eval_examples(cfg2, 2)
    for i, e in enumerate(ex):
        np.testing.assert_array_equal(e["image"], foreign_image("val", int(e["dense_caption"].split()[-1])))
    # Explicit keys, and a clear error for a missing one.
    assert tfds_folder.open_tfds_dataset(bdir, "train", caption_key="caption").caption_key == "caption"
    with pytest.raises(ValueError, match="caption_key"):
        tfds_folder.open_tfds_dataset(bdir, "train", caption_key="no_such")
    with pytest.raises(FileNotFoundError, match="not prepared"):
        tfds_folder.open_tfds_dataset("foreign_set", "train", data_dir=str(os.path.dirname(data_dir)))


# ------------------------------------------------------------------------------------------- multi-host


class CountingSource:
    """Forwards to a tfds source (sidecar lookup included) and records every position read."""

    def __init__(self, source):
        self._source = source
        self.dataset_info = source.dataset_info
        self.split = source.split
        self.reads = []

    def __len__(self):
        return len(self._source)

    def __getitem__(self, i):
        self.reads.append(int(i))
        return self._source[i]

    def __getitems__(self, idx):
        self.reads.extend(int(i) for i in idx)
        return [self._source[int(i)] for i in idx]


def test_each_process_reads_only_its_rows(built, tokenizer, monkeypatch):
    cfg = pipeline.default_data_config()
    cfg.update(dict(source="tfds", dir=built.out_dir, buckets="48x48", worker_threads=0, prefetch=0,
                    max_text_len=16))
    opened = []
    real_open = pipeline.open_split

    def counting_open(data_cfg, split):
        src = CountingSource(real_open(data_cfg, split))
        opened.append(src)
        return src

    monkeypatch.setattr(pipeline, "open_split", counting_open)
    steps, gb = 3, 4

    def run(p, count):
        it = iter(pipeline.make_train_dataset(cfg, tokenizer, global_batch_size=gb, seed=5, process_index=p,
                                              process_count=count))
        batches = [next(it) for _ in range(steps)]
        return batches, opened[-1].reads

    single, single_reads = run(0, 1)
    assert len(single_reads) == steps * gb  # sizes from the sidecar: no record read for bucketing
    for p in range(2):
        local, reads = run(p, 2)
        # Process p reads exactly its rows p*2:(p+1)*2 of every global batch, nothing else.
        assert reads == [single_reads[k * gb + p * 2 + r] for k in range(steps) for r in range(2)]
        for k in range(steps):
            for key in single[k]:
                np.testing.assert_array_equal(local[k][key], single[k][key][p * 2:(p + 1) * 2])


def test_bench_read_smoke(built):
    from lens_jax.bench.read import bench_read

    r = bench_read(built.out_dir, "48x48", n=8, threads=(0, 2), batch=4)
    assert set(r["pipeline"]) == {"threads=0", "threads=2"}
    for v in r["pipeline"].values():
        assert v["images_per_s"] > 0 and v["valid_fraction"] == 1.0 and v["batch_shape"] == [4, 48, 48, 3]
    assert r["raw"]["images"] == 8 and r["raw"]["decode_resize_per_s"] > 0


def test_training_run_on_the_build_draws_its_sample_grid(built, tmp_path):
    """lens_jax.train on a user build: eval images of several sizes (and user captions) feed the sample grid."""
    from conftest import micro_config
    from lens_jax.train.loop import train
    from lens_jax.train.metrics import read_metrics

    cfg = micro_config(tmp_path / "unused", **{"data.source": "tfds", "data.dir": str(built.out_dir),
                                                "data.buckets": "32x32", "total_steps": 2, "checkpoint_every": 2,
                                                "sample.num_prompts": 2, "data.max_text_len": 48})
    train(cfg, tmp_path / "run", progress=False)
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2]
    assert (tmp_path / "run" / "samples" / "latest.png").stat().st_size > 0
