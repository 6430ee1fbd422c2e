"""The precompute of latents and text features: equality with the on-the-fly path, kill-and-resume
(each record exactly once), the same train step and loss, training end to end, mismatch errors."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import REPO, micro_config
from lens_jax.data import pipeline, precompute as pc, precomputed as fmt

RPS = 12  # records per shard: 64 micro records -> shards of 12,12,12,12,12,4
TINY_VAE = {"codec.kind": "flux2", "codec.seed": 5, "model.in_channels": 16, "model.out_channels": 16,
            "codec.vae": dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)}


def _precompute(cfg, out, **kw):
    kw = {"records_per_shard": RPS, "features_dtype": "float32", "progress": False, **kw}
    return pc.precompute(cfg, out, **kw)


@pytest.fixture(scope="module")
def pixel_f32(tmp_path_factory, shapes_data_dir):
    out = tmp_path_factory.mktemp("pre") / "pixel_f32"
    r = _precompute(micro_config(shapes_data_dir), out)
    assert r["complete"] and r["images"] == 64 and r["shards_written"] == 6
    return out


@pytest.fixture(scope="module")
def flux2_bf16(tmp_path_factory, shapes_data_dir):
    out = tmp_path_factory.mktemp("pre") / "flux2_bf16"
    r = _precompute(micro_config(shapes_data_dir, **TINY_VAE), out, features_dtype="bfloat16")
    assert r["complete"] and r["images"] == 64
    return out


def _frozen(cfg):
    from lens_jax.parallel.mesh import make_mesh
    from lens_jax.text.encoder import load_text_encoder
    from lens_jax.train.frozen import load_codec
    from lens_jax.train.loop import load_tokenizer

    mesh = make_mesh(dict(cfg.mesh))
    with jax.set_mesh(mesh):
        codec = load_codec(cfg.codec, mesh, None)
        graphdef, params, shardings = load_text_encoder(cfg.text_encoder, mesh, None)
    return mesh, load_tokenizer(cfg, None), codec, graphdef, params, shardings


def _batches(data_cfg, tok, n, seed=0):
    it = iter(pipeline.make_train_dataset(data_cfg, tok, global_batch_size=8, seed=seed))
    return [next(it) for _ in range(n)]


def _records(out: pathlib.Path) -> dict[int, list]:
    """pos -> [(shard file, decoded record)] over every complete shard of the train split."""
    from array_record.python.array_record_module import ArrayRecordReader

    plan = json.loads((out / fmt.PLAN).read_text())
    found: dict[int, list] = {}
    for name, entry in plan["splits"]["train"]["buckets"].items():
        for spec in fmt.bucket_shards("train", name.split("x"), entry["num_records"], plan["records_per_shard"]):
            path = out / spec["file"]
            if not path.is_file():
                continue
            reader = ArrayRecordReader(str(path))
            raws = reader.read_all()
            reader.close()
            assert len(raws) == spec["stop"] - spec["start"], spec
            for raw in raws:
                rec = fmt.decode_record(raw, latent_shape=plan["latent_shapes"][name], text_dims=plan["text_shape"][1:],
                                        latents_dtype=plan["latents_dtype"], features_dtype=plan["features_dtype"])
                found.setdefault(rec["pos"], []).append((spec["file"], rec))
    return found


def _assert_same_records(a: pathlib.Path, b: pathlib.Path):
    ra, rb = _records(a), _records(b)
    assert sorted(ra) == sorted(rb) == list(range(64))
    for pos in ra:
        (fa, x), = ra[pos]
        (fb, y), = rb[pos]
        assert fa == fb and x["key"] == y["key"] and x["valid"] == y["valid"]
        np.testing.assert_array_equal(x["latents"], y["latents"])
        for kind in fmt.KINDS:
            assert x[kind]["tokens"] == y[kind]["tokens"]
            np.testing.assert_allclose(x[kind]["hidden"], y[kind]["hidden"], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ (a)


@pytest.mark.parametrize("kind", ["pixel", "flux2"])
def test_precomputed_equals_on_the_fly(kind, request, shapes_data_dir):
    """Same examples in the same order as the raw pipeline ('mix' captions over two epochs); latents and
    features equal the jitted on-the-fly encoders: exactly with float32 storage (pixel), the bf16 cast
    of them with bf16 storage (flux2)."""
    from lens_jax.text.features import text_features

    out = request.getfixturevalue("pixel_f32" if kind == "pixel" else "flux2_bf16")
    overrides = {} if kind == "pixel" else TINY_VAE
    cfg = micro_config(shapes_data_dir, **{**overrides, "data.caption": "mix"})
    mesh, tok, codec, graphdef, params, _ = _frozen(cfg)
    pre_cfg = micro_config(shapes_data_dir, **{**overrides, "data.caption": "mix", "data.source": "precomputed",
                                               "data.dir": str(out)})
    n = 10  # 8 batches per epoch: crosses into the second epoch, whose 'mix' choices differ
    raws, pres = _batches(cfg.data, tok, n), _batches(pre_cfg.data, tok, n)
    encode = jax.jit(lambda c, x: c.encode(x))
    features = jax.jit(text_features, static_argnums=(0, 4))
    lat_dtype = np.float32
    txt_dtype = np.float32 if kind == "pixel" else ml_dtypes.bfloat16
    for raw, pre in zip(raws, pres):
        assert sorted(pre) == ["latents", "text_hidden", "text_mask", "valid"]
        np.testing.assert_array_equal(pre["valid"], raw["valid"])
        lat = np.asarray(encode(codec, raw["images"]))
        hidden, mask = (np.asarray(v) for v in features(graphdef, params, raw["text_ids"], raw["text_mask"], 0))
        assert pre["latents"].dtype == lat_dtype and pre["text_hidden"].dtype == txt_dtype
        np.testing.assert_array_equal(pre["latents"], lat)
        np.testing.assert_array_equal(pre["text_mask"], mask)
        np.testing.assert_array_equal(pre["text_hidden"], hidden.astype(txt_dtype))
    # Both caption kinds were used (the mix draws differ between the two epochs).
    lengths = {int(m.sum()) for pre in pres for m in pre["text_mask"]}
    assert len(lengths) > 3


def test_several_buckets_give_the_raw_pipelines_batches(tmp_path):
    """Three aspect-ratio buckets mixed by weight, two processes' rows: the same steps as the raw pipeline."""
    from lens_jax.text.features import text_features

    over = {"data.num_train": 48, "data.render_sizes": "32x32,64x32,32x64", "data.buckets": "32x32,64x32,32x64",
            "data.bucket_weights": "2,1,1", "data.caption": "mix"}
    cfg = micro_config(tmp_path / "data", **over)
    out = tmp_path / "pre"
    assert _precompute(cfg, out, records_per_shard=5)["complete"]
    pre_cfg = micro_config(tmp_path / "data", **{**over, "data.source": "precomputed", "data.dir": str(out)})
    mesh, tok, codec, graphdef, params, _ = _frozen(cfg)
    encode = jax.jit(lambda c, x: c.encode(x))
    features = jax.jit(text_features, static_argnums=(0, 4))
    shapes_seen = set()
    for p in range(2):
        kw = dict(global_batch_size=8, seed=1, process_index=p, process_count=2)
        raw_it = iter(pipeline.make_train_dataset(cfg.data, tok, **kw))
        pre_it = iter(pipeline.make_train_dataset(pre_cfg.data, tok, **kw))
        for _ in range(6):
            raw, pre = next(raw_it), next(pre_it)
            shapes_seen.add(raw["images"].shape)
            np.testing.assert_array_equal(pre["latents"], np.asarray(encode(codec, raw["images"])))
            hidden, mask = features(graphdef, params, raw["text_ids"], raw["text_mask"], 0)
            np.testing.assert_array_equal(pre["text_mask"], np.asarray(mask))
            np.testing.assert_array_equal(pre["text_hidden"], np.asarray(hidden))
    assert len(shapes_seen) == 3


# ------------------------------------------------------------------------------------------------ (b)


def test_max_shards_then_resume_covers_each_record_once(pixel_f32, tmp_path, shapes_data_dir):
    cfg = micro_config(shapes_data_dir)
    out = tmp_path / "pre"
    first = _precompute(cfg, out, max_shards_this_run=2)
    assert not first["complete"] and first["shards_written"] == 2 and first["images"] == 24
    assert not (out / fmt.MANIFEST).exists()
    with pytest.raises(FileNotFoundError, match="has not finished"):
        _batches(micro_config(shapes_data_dir, **{"data.source": "precomputed", "data.dir": str(out)}).data,
                 pipeline.default_tokenizer(), 1)
    second = _precompute(cfg, out)
    assert second["complete"] and second["shards_written"] == 4 and second["images"] == 40
    assert _precompute(cfg, out)["images"] == 0  # complete: nothing to do
    _assert_same_records(out, pixel_f32)


def _config_file(tmp_path, data_dir, **overrides) -> pathlib.Path:
    path = tmp_path / "micro_cfg.py"
    path.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from conftest import micro_config\n\n"
        "def get_config():\n"
        f"    return micro_config({str(data_dir)!r}, **{overrides!r})\n")
    return path


def test_cli_sigkill_then_resume_covers_each_record_once(pixel_f32, tmp_path, shapes_data_dir):
    """The CLI is SIGKILLed after its first shard is complete, while the second one is written but not
    yet renamed; the restart skips the first, redoes the second, and every record appears once."""
    out = tmp_path / "pre"
    cfg_file = _config_file(tmp_path, shapes_data_dir)
    script = (
        "import os, signal\n"
        "import lens_jax.data.precompute as pc\n"
        "done = []\n"
        "orig = pc._finish_shard\n"
        "def finish(w):\n"
        "    done.append(w)\n"
        "    if len(done) == 2:\n"
        "        w.writer.close(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "    orig(w)\n"
        "pc._finish_shard = finish\n"
        f"pc.run(['--config', {str(cfg_file)!r}, '--out', {str(out)!r}, '--records_per_shard', '{RPS}',\n"
        "        '--features_dtype', 'float32', '--noprogress'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=str(REPO))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    shards = sorted(p.name for p in (out / "train" / "32x32").iterdir())
    assert shards[0].startswith(".00001-of-00006.array_record.tmp-"), shards  # written, never renamed
    assert shards[1:] == ["00000-of-00006.array_record"], shards
    assert not (out / fmt.MANIFEST).exists()
    assert len(_records(out)) == 12

    proc = subprocess.run([sys.executable, "-m", "lens_jax.data.precompute", "--config", str(cfg_file), "--out",
                           str(out), "--records_per_shard", str(RPS), "--features_dtype", "float32", "--noprogress"],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["complete"] and result["shards_written"] == 5 and result["images"] == 52
    assert sorted(p.name for p in (out / "train" / "32x32").iterdir()) == [f"{i:05d}-of-00006.array_record"
                                                                           for i in range(6)]
    _assert_same_records(out, pixel_f32)
    # A restart with other parameters is refused, not mixed in.
    with pytest.raises(ValueError, match="other parameters.*records_per_shard"):
        _precompute(micro_config(shapes_data_dir), out, records_per_shard=16)


# ------------------------------------------------------------------------------------------------ (c)


def test_train_step_on_precomputed_batch_equals_raw_batch(tmp_path, shapes_data_dir):
    """With corrupt records and missing captions ('mix' captions): the same rows are valid, and one train
    step (same rng, so the same text dropout, sigmas and noise) gives the same loss and parameters."""
    from lens_jax.data import shapes, tfds_shapes
    from lens_jax.models.dit import DiTConfig
    from lens_jax.parallel.placement import batch_sharding, host_batch_to_global, replicated
    from lens_jax.train.optimizer import learning_rate_schedule, make_optimizer
    from lens_jax.train.state import abstract_dit, init_train_state, train_state_shardings
    from lens_jax.train.step import jit_train_step, make_train_step, step_config

    recs = shapes.make_records(seed=3, stream=0, start=0, stop=16, sizes=[(32, 32)])
    recs[2]["image"] = b"\x89PNG\r\n\x1a\nnot an image"
    recs[7]["image"] = recs[7]["image"][:40]
    recs[11]["short_caption"] = ""
    recs[12]["dense_caption"] = ""
    builder_dir = tfds_shapes.write_tfds_dataset(tmp_path / "user_data", {"train": recs, "eval": recs[:4]})
    over = {"data.source": "tfds", "data.dir": builder_dir, "data.caption": "mix", "loss.text_dropout": 0.3}
    cfg = micro_config(shapes_data_dir, **over)
    out = tmp_path / "pre"
    r = _precompute(cfg, out)
    assert r["complete"] and r["invalid_images"] == 2
    pre_cfg = micro_config(shapes_data_dir, **{**over, "data.source": "precomputed", "data.dir": str(out)})
    mesh, tok, codec, enc_graphdef, enc_params, enc_sh = _frozen(cfg)
    raws, pres = _batches(cfg.data, tok, 2), _batches(pre_cfg.data, tok, 2)  # one epoch: every bad record
    assert sum(float((1 - b["valid"]).sum()) for b in raws) > 0
    for raw, pre in zip(raws, pres):
        np.testing.assert_array_equal(raw["valid"], pre["valid"])

    dit_cfg = DiTConfig.from_dict(cfg.model)
    with jax.set_mesh(mesh):
        tx = make_optimizer(cfg.optimizer, 10)
        graphdef, abstract = abstract_dit(dit_cfg)
        sh = train_state_shardings(abstract, tx, mesh, False)
        step = make_train_step(graphdef, enc_graphdef, tx, learning_rate_schedule(cfg.optimizer, 10), step_config(cfg))
        bs = lambda nd: batch_sharding(mesh, nd)  # noqa: E731
        raw_step = jit_train_step(step, sh, bs, {"text_encoder": enc_sh, "codec": jax.tree.map(lambda _: replicated(mesh), codec)},
                                  replicated(mesh))
        pre_step = jit_train_step(step, sh, bs, {}, replicated(mesh))
        state = init_train_state(dit_cfg, tx, 0, sh, False)
        fresh = lambda: jax.tree.map(lambda x: x.copy(), state)  # noqa: E731 - the step donates its state
        for k, (raw, pre) in enumerate(zip(raws, pres)):
            rng = jax.random.key(100 + k)
            s_raw, m_raw = raw_step(fresh(), host_batch_to_global(raw, mesh), rng,
                                    {"text_encoder": enc_params, "codec": codec})
            s_pre, m_pre = pre_step(fresh(), host_batch_to_global(pre, mesh), rng, {})
            assert float(m_raw["skipped"]) == float(m_pre["skipped"])
            np.testing.assert_allclose(float(m_pre["loss"]), float(m_raw["loss"]), rtol=1e-5)
            np.testing.assert_allclose(float(m_pre["grad_norm"]), float(m_raw["grad_norm"]), rtol=1e-4)
            for a, b in zip(jax.tree.leaves(s_raw.params), jax.tree.leaves(s_pre.params)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)  # lr 1e-3


# ------------------------------------------------------------------------------------------------ (d)


def test_train_cli_from_precomputed(pixel_f32, tmp_path, shapes_data_dir):
    from lens_jax.train.metrics import read_metrics

    cfg_file = _config_file(tmp_path, shapes_data_dir, **{"total_steps": 2, "checkpoint_every": 2})
    proc = subprocess.run(
        [sys.executable, "-m", "lens_jax.train", "--config", str(cfg_file), "--workdir", str(tmp_path / "run"),
         "--config.data.source=precomputed", f"--config.data.dir={pixel_f32}"],
        capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    # Sample grids still work: the encoder and codec are loaded for them (and saved for later sampling).
    assert (tmp_path / "run" / "samples" / "latest.png").stat().st_size > 1000
    assert (tmp_path / "run" / "text_encoder" / "lens_jax.json").exists()


# ------------------------------------------------------------------------------------------------ (e)


def test_mismatched_run_config_is_refused_naming_the_field(pixel_f32, tmp_path, shapes_data_dir):
    from lens_jax.train.loop import train

    base = {"data.source": "precomputed", "data.dir": str(pixel_f32)}
    tok = pipeline.default_tokenizer()
    fmt.check_run_config(micro_config(shapes_data_dir, **base), tok)  # the matching config passes
    cases = [
        ({"text_encoder.seed": 1}, r"config\.text_encoder\.weights / text_encoder\.seed: precomputed with "
                                   r"\{'random_seed': 0\}, this run has \{'random_seed': 1\}"),
        ({"text_encoder.offset": 2}, r"config\.text_encoder\.offset"),
        ({"codec.patch": 4, "model.in_channels": 48, "model.out_channels": 48}, r"config\.codec\.patch"),
        ({**TINY_VAE}, r"config\.codec\.kind"),
    ]
    for over, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fmt.check_run_config(micro_config(shapes_data_dir, **{**base, **over}), tok)
    # text_encoder.model: the differing sub-field is named.
    enc = dict(micro_config(shapes_data_dir).text_encoder.model)
    with pytest.raises(ValueError, match=r"config\.text_encoder\.model\.num_local_experts"):
        fmt.check_run_config(micro_config(shapes_data_dir, **{**base, "text_encoder.model": {**enc, "num_local_experts": 4}}), tok)
    # Training refuses before any step; the data pipeline checks its own fields.
    with pytest.raises(ValueError, match=r"config\.text_encoder\.weights"):
        train(micro_config(shapes_data_dir, **{**base, "text_encoder.seed": 3}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"config\.data\.max_text_len"):
        _batches(micro_config(shapes_data_dir, **{**base, "data.max_text_len": 16}).data, tok, 1)
    with pytest.raises(ValueError, match=r"data\.dir: required"):
        pipeline.validate_data_config({"source": "precomputed", "buckets": "32x32"})
