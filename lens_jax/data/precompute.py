"""Precompute the frozen encoders' outputs once: codec latents and text features as ArrayRecord shards.

    python -m lens_jax.data.precompute --config configs/tiny.py --out DIR [--config.FIELD=VALUE ...]
        [--weights WEIGHTS_DIR] [--splits train[,eval]] [--batch_size N] [--records_per_shard N]
        [--features_dtype bfloat16|float32] [--latents_dtype float32|bfloat16] [--max_shards_this_run N]
        [--overwrite]

then train with ``--config.data.source=precomputed --config.data.dir=DIR`` (same config otherwise).

What is computed: for every record of each split, its image decoded, resized and centre-cropped to
its bucket and encoded by the run's codec (`config.codec`: the pixel stand-in or the FLUX.2 VAE,
packed and normalised latents), and BOTH its captions tokenized to `data.max_text_len` and encoded
by `lens_jax.text.features.text_features` (the one function training and sampling use) with the
run's text encoder (`config.text_encoder`), the offset dropped. Exactly what the train step computes
on the fly, so training from the files gives the same loss.

Where the dataset and the weights come from: the dataset is the run config's `data` section
(`data.source` 'shapes' or 'tfds', `data.dir` / `data.name`, `data.buckets`); the encoder, codec and
tokenizer are the config's `text_encoder.weights` / `text_encoder.seed`, `codec.weights` / `codec.seed`
and `text_encoder.tokenizer`, as in training ('' = the same seeded random weights a run would make).
`--weights DIR` is a shorthand for a converted pipeline folder or a training workdir (both hold
`text_encoder/`, `vae/`, `tokenizer/`): it sets `text_encoder.weights=DIR/text_encoder`,
`codec.weights=DIR/vae` (codec 'flux2') and `text_encoder.tokenizer=DIR/tokenizer` (when present).
The manifest records a fingerprint of all of them; the training run must name the same ones (it
refuses otherwise, naming the field), because its sample grids use them.

Sharding: shards (see lens_jax/data/precomputed.py for the layout) are dealt to processes
round-robin; within a process the batch is placed on the mesh (`config.mesh`) split over its data
axes, the text encoder's parameters restored into their mesh shardings as a training run does, and
both encoders run as jitted, sharded programs. Processes step through each bucket in lockstep (a
process with less work feeds empty rows), as the jitted programs are collective. For several hosts,
`--out` must be a filesystem all of them see (as the training workdir).

Resumable: a shard is written under a temporary name and renamed when complete; a shard's records
are a fixed slice of the dataset, so a restart skips the complete shards and redoes the others: each
record is written exactly once. `manifest.json` is written last.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import time
from typing import Sequence

import grain
import jax
import numpy as np

from lens_jax import config as config_lib
from lens_jax.data import buckets as buckets_lib
from lens_jax.data import pipeline
from lens_jax.data import precomputed as fmt
from lens_jax.data import tfds_shapes
from lens_jax.data import tokenizer as tokenizer_lib

INVALID_IMAGE = "corrupt or unreadable image"
# One record per group (random access for the shuffled reader); zstd level 1: the same size as
# ArrayRecord's default brotli on bf16/float32 features (~0.78) and ~4x faster to read.
WRITER_OPTIONS = "group_size:1,zstd:1"


def apply_weights_dir(cfg, weights_dir: str) -> dict:
    """Point the config's encoder, codec and tokenizer at a converted pipeline folder or a workdir.

    Returns {field: value} of what was set."""
    root = pathlib.Path(weights_dir).expanduser().absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"--weights: {root} is not a directory")
    set_ = {}
    enc = root / "text_encoder"
    if not enc.is_dir():
        raise FileNotFoundError(f"--weights: {root} has no text_encoder/ (expected a converted pipeline folder "
                                f"or a training workdir)")
    set_["text_encoder.weights"] = str(enc)
    if cfg.codec.kind == "flux2":
        vae = root / "vae"
        if not vae.is_dir():
            raise FileNotFoundError(f"--weights: {root} has no vae/ but config.codec.kind='flux2'")
        set_["codec.weights"] = str(vae)
    if (root / "tokenizer").is_dir():
        set_["text_encoder.tokenizer"] = str(root / "tokenizer")
    for k, v in set_.items():
        config_lib.set_field(cfg, k, v)
    return set_


# --------------------------------------------------------------------------------------------------
# Planning


def make_plan(cfg, tokenizer, *, splits: Sequence[str], records_per_shard: int, features_dtype: str,
              latents_dtype: str) -> dict:
    """Everything that determines the output (compared on restart), with the shard list per bucket."""
    from lens_jax.models.codec import codec_geometry
    from lens_jax.text.encoder import encoder_config

    settings = pipeline.validate_data_config(cfg.data)
    data = cfg.data.to_dict()
    data["dir"] = os.path.abspath(pipeline.dataset_dir(cfg.data)) if (settings.dir or settings.source == "shapes") \
        else ""
    f, channels = codec_geometry(cfg.codec)
    enc = encoder_config(cfg.text_encoder)
    text_len = max(0, settings.max_text_len - int(cfg.text_encoder.offset))
    plan = {
        "format_version": fmt.FORMAT_VERSION,
        "fingerprint": fmt.fingerprint(cfg, tokenizer),
        "data": data,
        "buckets": buckets_lib.format_sizes(settings.buckets),
        "latent_shapes": {},
        "text_shape": [text_len, len(enc.selected_layers), enc.hidden_size],
        "features_dtype": features_dtype,
        "latents_dtype": latents_dtype,
        "records_per_shard": int(records_per_shard),
        "array_record_options": WRITER_OPTIONS,
        "splits": {},
    }
    for (w, h) in settings.buckets:
        if w % f or h % f:
            raise ValueError(f"data.buckets: {w}x{h} is not a multiple of the {cfg.codec.kind} codec's {f} pixels "
                             f"per token")
        plan["latent_shapes"][fmt.bucket_name((w, h))] = [h // f, w // f, channels]
    members = {}
    for split in splits:
        source = pipeline.open_split(cfg.data, split)
        sizes = tfds_shapes.record_sizes(source, split)
        parts = pipeline.bucket_slices(sizes, settings.buckets, [1.0] * len(settings.buckets))
        entry = {"num_records": int(len(sizes)), "buckets": {}}
        for b, positions in parts:
            n = len(positions)
            entry["buckets"][fmt.bucket_name(settings.buckets[b])] = {
                "bucket": b, "num_records": n, "num_shards": math.ceil(n / records_per_shard)}
            members[(split, b)] = positions
        plan["splits"][split] = entry
    return json.loads(json.dumps(plan)), members


def _diff(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if a == b else [path]


def _write_json_atomic(path: pathlib.Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _allgather_ints(values: Sequence[int]) -> np.ndarray:
    """[process_count, len(values)] int64."""
    local = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return local[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)


# --------------------------------------------------------------------------------------------------
# Reading and preparing records


class _Prepare:
    """(shard, row, position) -> the record's image at its bucket and both captions tokenized.

    The same steps as pipeline.RecordToExample (decode_image, resize_crop, strip, tokenize), for
    both captions at once."""

    def __init__(self, source, bucket, tokenizer, max_text_len: int):
        self.source, self.bucket, self.tokenizer, self.max_len = source, bucket, tokenizer, max_text_len

    def __call__(self, item):
        shard, row, pos = (int(v) for v in item)
        rec = self.source[pos]
        try:
            key = int(rec.get("index", -1))
        except (TypeError, ValueError):
            key = -1
        image = pipeline.decode_image(rec.get("image"))
        reason = "" if image is not None else INVALID_IMAGE
        if image is not None:
            try:
                image = buckets_lib.resize_crop(image, self.bucket)
            except Exception as e:  # noqa: BLE001 - the record is marked invalid, as in the pipeline
                image, reason = None, f"{type(e).__name__}: {e}"
        w, h = self.bucket
        texts = [pipeline._as_text(rec.get(fmt.CAPTION_FIELDS[k])).strip() for k in fmt.KINDS]
        ids = np.zeros((len(texts), self.max_len), np.int32)
        mask = np.zeros((len(texts), self.max_len), bool)
        for i, text in enumerate(texts):
            if not text:
                continue
            try:
                ids[i], mask[i] = (a[0] for a in tokenizer_lib.tokenize(self.tokenizer, [text], self.max_len))
            except Exception:  # noqa: BLE001 - counts as a caption without tokens
                pass
        return {
            "shard": shard, "row": row, "pos": pos, "key": key, "reason": reason,
            "image": image if image is not None else np.zeros((h, w, 3), np.uint8),
            "present": np.array([bool(t) for t in texts]), "ids": ids, "mask": mask,
        }


class _ShardWriter:
    """Writes one shard under a temporary name; renamed into place when its last record is in."""

    def __init__(self, out: pathlib.Path, spec: dict):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.final = out / spec["file"]
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")
        self.expected = spec["stop"] - spec["start"]
        self.written = 0
        self.writer = ArrayRecordWriter(str(self.tmp), WRITER_OPTIONS)

    def write(self, row: int, record: bytes) -> bool:
        if row != self.written:
            raise RuntimeError(f"{self.final}: row {row} arrived, {self.written} expected")
        self.writer.write(record)
        self.written += 1
        return self.written == self.expected

    def finish(self) -> None:
        self.writer.close()
        os.replace(self.tmp, self.final)


def _finish_shard(writer: _ShardWriter) -> None:
    writer.finish()


def _shards(plan: dict, split: str, name: str) -> list[dict]:
    entry = plan["splits"][split]["buckets"][name]
    return fmt.bucket_shards(split, buckets_lib.parse_sizes(name)[0], entry["num_records"], plan["records_per_shard"])


def _complete_files(out: pathlib.Path, split: str, name: str) -> set[str]:
    """Relative names of the complete shards of a bucket (one directory listing)."""
    d = out / split / name
    return {f"{split}/{name}/{f}" for f in os.listdir(d) if not f.startswith(".")} if d.is_dir() else set()


def _clean_stale(out: pathlib.Path, plan: dict) -> None:
    """Remove the temporary files of unfinished shards (a killed run's)."""
    for split, entry in plan["splits"].items():
        for name in entry["buckets"]:
            d = out / split / name
            if d.is_dir():
                for stale in d.glob(".*.tmp-*"):
                    stale.unlink(missing_ok=True)


class _Items:
    """(shard slot, row in shard, source position) of this process's rows of a bucket, in order (lazy)."""

    def __init__(self, specs: list[dict], positions: np.ndarray):
        self.specs, self.positions = specs, positions
        self.ends = np.cumsum([s["stop"] - s["start"] for s in specs]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i: int):
        slot = int(np.searchsorted(self.ends, i, side="right"))
        row = int(i) - (int(self.ends[slot - 1]) if slot else 0)
        return slot, row, int(self.positions[self.specs[slot]["start"] + row])


# --------------------------------------------------------------------------------------------------
# The job


def precompute(cfg, out_dir, *, splits: Sequence[str] = ("train",), batch_size: int | None = None,
               records_per_shard: int = 256, features_dtype: str = "bfloat16", latents_dtype: str = "float32",
               progress: bool = True, max_shards_this_run: int | None = None, overwrite: bool = False) -> dict:
    """Run (or resume) the precompute into `out_dir`; returns statistics.

    `batch_size`: images per encode call over all processes (default data.global_batch_size); it must
    divide over the mesh's data x fsdp devices. `max_shards_this_run`: stop after this process has
    completed that many shards (the rest is done by a later call). The result has `complete` (the
    manifest is written), `images` (encoded by this process in this call), `images_per_s`, ...
    """
    from lens_jax.parallel.mesh import data_parallel_size, make_mesh
    from lens_jax.parallel.placement import batch_sharding, host_batch_to_global, replicated
    from lens_jax.text.encoder import load_text_encoder
    from lens_jax.text.features import text_features
    from lens_jax.train.frozen import load_codec
    from lens_jax.train.loop import load_tokenizer

    config_lib.validate(cfg)
    settings = pipeline.validate_data_config(cfg.data)
    if settings.source == "precomputed":
        raise ValueError("data.source: the precompute reads a raw dataset ('shapes' or 'tfds'), not 'precomputed'")
    for name, value in (("features_dtype", features_dtype), ("latents_dtype", latents_dtype)):
        if value not in fmt.DTYPES:
            raise ValueError(f"{name}: {value!r} is not one of {sorted(fmt.DTYPES)}")
    if int(records_per_shard) <= 0:
        raise ValueError(f"records_per_shard: must be positive, got {records_per_shard}")
    splits = [s for s in (splits.split(",") if isinstance(splits, str) else splits) if s]
    out = pathlib.Path(out_dir).expanduser().absolute()
    P, p = jax.process_count(), jax.process_index()
    is_main = p == 0
    mesh = make_mesh(dict(cfg.mesh))
    dp = data_parallel_size(mesh)
    batch = int(batch_size or cfg.data.global_batch_size)
    if batch <= 0 or batch % dp or batch % P:
        raise ValueError(f"batch_size={batch} must be a positive multiple of the data x fsdp = {dp} mesh devices "
                         f"and of the {P} processes")
    b_local = batch // P

    tok = load_tokenizer(cfg, None)
    plan, members = make_plan(cfg, tok, splits=splits, records_per_shard=int(records_per_shard),
                              features_dtype=features_dtype, latents_dtype=latents_dtype)
    result = {"out": str(out), "complete": False, "images": 0, "invalid_images": 0, "shards_written": 0,
              "seconds": 0.0, "images_per_s": None, "process_index": p, "process_count": P, "batch_size": batch}
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        found = json.loads((out / fmt.PLAN).read_text()) if (out / fmt.PLAN).is_file() else None
        if found is not None and found != plan:
            if not overwrite:
                diff = _diff(found, plan)
                raise ValueError(f"{out} holds a precompute with other parameters (differing: {', '.join(diff[:8])}); "
                                 f"choose another --out or pass --overwrite to start it again")
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        elif found is None and any(out.iterdir()):
            raise ValueError(f"--out {out} is not empty and holds no precompute ({fmt.PLAN} missing)")
        _write_json_atomic(out / fmt.PLAN, plan)
    _sync("lens_jax.precompute:plan")
    if (out / fmt.MANIFEST).is_file():
        result["complete"] = True
        if is_main and progress:
            print(f"precompute: {out} is already complete", flush=True)
        return result

    # This process's shards (round-robin), in plan order, skipping complete ones.
    todo: dict[tuple[str, int], list[dict]] = {}
    n_todo = 0
    for split in splits:
        for name, entry in plan["splits"][split]["buckets"].items():
            done = _complete_files(out, split, name)
            for i, spec in enumerate(_shards(plan, split, name)):
                if i % P != p or spec["file"] in done:
                    continue
                if max_shards_this_run is not None and n_todo >= max_shards_this_run:
                    break
                todo.setdefault((split, entry["bucket"]), []).append(spec)
                n_todo += 1
    if is_main:
        _clean_stale(out, plan)
    _sync("lens_jax.precompute:clean")

    offset = int(cfg.text_encoder.offset)
    fdt, ldt = fmt.DTYPES[features_dtype], fmt.DTYPES[latents_dtype]
    bs = lambda nd: batch_sharding(mesh, nd)  # noqa: E731
    total_rows = sum(spec["stop"] - spec["start"] for shards in todo.values() for spec in shards)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_rows, desc=f"precompute (process {p})" if P > 1 else "precompute",
                   unit="img", dynamic_ncols=True)
    first_batch_s, first_rows = 0.0, 0
    with jax.set_mesh(mesh):
        codec = load_codec(cfg.codec, mesh, None)
        enc_graphdef, enc_params, enc_shardings = load_text_encoder(cfg.text_encoder, mesh, None)
        encode_text = jax.jit(lambda params, ids, mask: text_features(enc_graphdef, params, ids, mask, offset),
                              in_shardings=(enc_shardings, bs(2), bs(2)), out_shardings=(bs(4), bs(2)))
        encode_images = jax.jit(lambda c, images: c.encode(images),
                                in_shardings=(jax.tree.map(lambda _: replicated(mesh), codec), bs(4)),
                                out_shardings=bs(4))
        t0 = time.perf_counter()
        for split in splits:
            source = pipeline.open_split(cfg.data, split)
            for entry in plan["splits"][split]["buckets"].values():
                b = entry["bucket"]
                size = settings.buckets[b]
                mine = todo.get((split, b), [])
                items = _Items(mine, members[(split, b)])
                n_batches = int(_allgather_ints([math.ceil(len(items) / b_local)]).max())
                if n_batches == 0:
                    continue
                rows = _rows(items, _Prepare(source, size, tok, settings.max_text_len), settings.worker_threads,
                             settings.prefetch * b_local)
                writers: dict[int, _ShardWriter] = {}
                tb = time.perf_counter()
                pending = None
                for k in range(n_batches + 1):
                    current = None
                    if k < n_batches:  # dispatch batch k (asynchronous) ...
                        chunk = [r for _, r in zip(range(b_local), rows)]
                        host = _stack(chunk, b_local, size, settings.max_text_len)
                        g = host_batch_to_global(host, mesh)
                        if g["images"].shape[0] != batch:
                            raise ValueError(f"config.mesh: the data x fsdp axes must split the batch over all {P} "
                                             f"processes for the precompute (global rows {g['images'].shape[0]}, "
                                             f"expected {batch})")
                        current = (chunk, encode_images(codec, g["images"]), *encode_text(enc_params, g["ids"], g["mask"]))
                    if pending is not None:  # ... and write batch k - 1 meanwhile
                        real = _write_batch(pending, b_local, mine, writers, out, result, fdt, ldt, features_dtype,
                                            latents_dtype)
                        if k == 1:
                            first_batch_s += time.perf_counter() - tb
                            first_rows += real
                        if bar is not None and real:
                            bar.update(real)
                    pending = current
                if writers:
                    raise RuntimeError(f"shards left unfinished: {[w.final for w in writers.values()]}")
        seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    result["seconds"] = seconds
    result["images_per_s"] = result["images"] / seconds if result["images"] and seconds > 0 else None
    steady_s, steady_n = seconds - first_batch_s, result["images"] - first_rows
    result["images_per_s_after_first_batch"] = steady_n / steady_s if steady_n > 0 and steady_s > 0 else None
    result["first_batches_s"] = first_batch_s

    # Complete when every shard of every process is on disk; the manifest is written last.
    missing_local = 0
    for split in splits:
        for name in plan["splits"][split]["buckets"]:
            done = _complete_files(out, split, name)
            missing_local += sum(1 for i, spec in enumerate(_shards(plan, split, name)) if i % P == p
                                 and spec["file"] not in done)
    stats = _allgather_ints([missing_local, result["images"], result["invalid_images"]])
    result["complete"] = bool(stats[:, 0].sum() == 0)
    result["images_all_processes"] = int(stats[:, 1].sum())
    if result["complete"] and is_main:
        manifest = dict(plan)
        for split in splits:
            for name, entry in manifest["splits"][split]["buckets"].items():
                entry["bytes"] = sum((out / spec["file"]).stat().st_size for spec in _shards(plan, split, name))
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _write_json_atomic(out / fmt.MANIFEST, manifest)
    _sync("lens_jax.precompute:manifest")
    if progress and is_main:
        rate = result["images_per_s"]
        print(f"precompute: {result['images']} images in {seconds:.1f} s"
              + (f" ({rate:.1f} images/s" + (f" per process, {P} processes" if P > 1 else "") + ")" if rate else "")
              + f", {result['shards_written']} shards written; "
              + ("complete: " + str(out / fmt.MANIFEST) if result["complete"] else "incomplete: run again to finish"),
              flush=True)
    return result


def _write_batch(pending, b_local, specs, writers, out, result, fdt, ldt, features_dtype, latents_dtype) -> int:
    """Serialize the real rows of an encoded batch into their shards; returns their number."""
    chunk, latents, hidden, hmask = pending
    latents, hidden, hmask = _local_rows(latents), _local_rows(hidden), _local_rows(hmask)
    real = 0
    for j, r in enumerate(chunk):
        if r is None:  # padding row
            continue
        real += 1
        slot = r["shard"]
        if slot not in writers:
            writers[slot] = _ShardWriter(out, specs[slot])
        caps = {}
        for c, kind in enumerate(fmt.KINDS):
            m = hmask[c * b_local + j]
            n = int(m.sum())
            if not m[:n].all():
                raise RuntimeError("text mask is not a prefix: the tokenizer must pad on the right")
            caps[kind] = {"present": bool(r["present"][c]), "tokens": int(r["mask"][c].sum()),
                          "hidden": hidden[c * b_local + j, :n].astype(fdt)}
        ok = not r["reason"]
        record = fmt.encode_record(pos=r["pos"], key=r["key"], valid=ok, reason=r["reason"],
                                   latents=latents[j].astype(ldt) if ok else None, captions=caps,
                                   latents_dtype=latents_dtype, features_dtype=features_dtype)
        result["invalid_images"] += int(not ok)
        if writers[slot].write(r["row"], record):
            _finish_shard(writers.pop(slot))
            result["shards_written"] += 1
    result["images"] += real
    return real


def _rows(items, prepare: _Prepare, threads: int, prefetch_rows: int):
    """Prepared rows in order (Grain threads read and decode ahead), then padding rows forever."""
    if items:
        ds = grain.MapDataset.source(items).map(prepare)
        if threads > 0:
            it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(1, prefetch_rows)))
        else:
            it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        yield from it
    while True:  # this process has no more work in the bucket: empty rows keep the lockstep
        yield None


def _stack(chunk, b_local: int, size, max_len: int) -> dict:
    w, h = size
    images = np.zeros((b_local, h, w, 3), np.uint8)
    ids = np.zeros((2 * b_local, max_len), np.int32)
    mask = np.zeros((2 * b_local, max_len), bool)
    for j, r in enumerate(chunk):
        if r is None:
            continue
        images[j] = r["image"]
        for c in range(len(fmt.KINDS)):
            ids[c * b_local + j], mask[c * b_local + j] = r["ids"][c], r["mask"][c]
    return {"images": images, "ids": ids, "mask": mask}


def _local_rows(arr: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order it supplied them."""
    if jax.process_count() == 1:
        return np.asarray(arr)
    seen = {}
    for s in arr.addressable_shards:
        start = s.index[0].start or 0
        if start not in seen:
            seen[start] = np.asarray(s.data)
    return np.concatenate([seen[k] for k in sorted(seen)])


# --------------------------------------------------------------------------------------------------
# CLI


def main(argv) -> None:
    from absl import flags, logging

    from lens_jax.parallel.distributed import maybe_initialize_distributed

    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    maybe_initialize_distributed()
    cfg = FLAGS.config
    if FLAGS.weights:
        for k, v in apply_weights_dir(cfg, FLAGS.weights).items():
            if jax.process_index() == 0:
                print(f"--weights: config.{k}={v}", flush=True)
    cfg = config_lib.validate(cfg)
    result = precompute(
        cfg, FLAGS.out, splits=FLAGS.splits, batch_size=FLAGS.batch_size, records_per_shard=FLAGS.records_per_shard,
        features_dtype=FLAGS.features_dtype, latents_dtype=FLAGS.latents_dtype, progress=FLAGS.progress,
        max_shards_this_run=FLAGS.max_shards_this_run, overwrite=FLAGS.overwrite)
    if jax.process_index() == 0:
        print(json.dumps(result, indent=1), flush=True)


def run(argv=None):
    import sys

    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (the run's config).",
                                    lock_config=True)
    flags.DEFINE_string("out", None, "Output directory (resumable; manifest.json marks completion).")
    flags.DEFINE_string("weights", "", "A converted pipeline folder or a training workdir: sets text_encoder.weights, "
                                       "codec.weights (flux2) and text_encoder.tokenizer from its subfolders.")
    flags.DEFINE_string("splits", "train", "Comma-separated splits to precompute.")
    flags.DEFINE_integer("batch_size", None, "Images per encode call over all processes (default: "
                                             "config.data.global_batch_size).")
    flags.DEFINE_integer("records_per_shard", 256, "Records per ArrayRecord shard (the unit of resumption).")
    flags.DEFINE_enum("features_dtype", "bfloat16", sorted(fmt.DTYPES), "Storage dtype of the text features.")
    flags.DEFINE_enum("latents_dtype", "float32", sorted(fmt.DTYPES), "Storage dtype of the latents.")
    flags.DEFINE_integer("max_shards_this_run", None, "Stop after this many shards per process (resumable).")
    flags.DEFINE_bool("overwrite", False, "Start again when --out holds a precompute with other parameters.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.mark_flags_as_required(["config", "out"])
    app.run(main, argv=argv if argv is None else [sys.argv[0]] + list(argv))


if __name__ == "__main__":
    run()
