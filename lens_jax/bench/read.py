"""The dataset reader's speed on CPU: images/s through the real Grain pipeline (read, decode, resize +
centre crop, tokenize, batch) and for decode + resize alone.

    python -m lens_jax.bench.read --data DIR [--buckets 256x256] [--n 1024] [--threads 0,2]
    python -m lens_jax.bench.read --synthetic 2000 --size 256x256 [--keep DIR]   (builds a JPEG folder first)
    python -m lens_jax.bench.read --config configs/tiny.py [--set data.dir=...]  (the config's data section)

``DIR`` is any build :func:`lens_jax.data.pipeline.open_split` reads with ``data.source='tfds'``
(an image-folder build, a shapes build, a TFDS builder directory). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np


def _data_config(data: Any, buckets: str | None):
    """A data section for ``data``: a directory, a full run config (uses .data) or a data section."""
    from lens_jax.data import pipeline

    cfg = pipeline.default_data_config()
    if isinstance(data, (str, os.PathLike)):
        cfg.update(dict(source="tfds", dir=str(data), name=""))
    else:
        section = data.get("data", data) if hasattr(data, "get") else data
        section = section.to_dict() if hasattr(section, "to_dict") else dict(section)
        for k, v in section.items():  # global_batch_size etc. are not the pipeline's
            if k in cfg or k == "scene":
                cfg[k] = v
    if buckets:
        cfg.buckets = buckets
    return cfg


def bench_read(data: Any, buckets: str | None = None, n: int = 1024, threads: Sequence[int] = (0, 2), *,
               batch: int = 16, prefetch: int = 4, split: str = "train", tokenizer=None,
               max_text_len: int = 128, seed: int = 0) -> dict[str, Any]:
    """Images per second for ``n`` images at each worker-thread count, and for raw decode + resize.

    ``pipeline``: :func:`make_train_dataset` end to end (the first batch, which opens the source and
    reads the sizes table, is not timed). ``raw``: the same records in one thread: the record read
    (``source[i]``), PIL decode to RGB, :func:`buckets.resize_crop` to the record's bucket, timed apart.
    """
    from lens_jax.data import buckets as buckets_lib
    from lens_jax.data import pipeline
    from lens_jax.data import tfds_shapes

    cfg = _data_config(data, buckets)
    settings = pipeline.validate_data_config(cfg)
    tok = tokenizer or pipeline.default_tokenizer()
    cfg.max_text_len = int(max_text_len)
    steps = max(1, int(n) // int(batch))
    out: dict[str, Any] = {
        "data": settings.dir or settings.name or settings.source, "split": split,
        "buckets": buckets_lib.format_sizes(settings.buckets), "batch": int(batch), "images": steps * int(batch),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "pipeline": {},
    }
    for t in threads:
        cfg.worker_threads = int(t)
        cfg.prefetch = int(prefetch) if t > 0 else 0
        t0 = time.perf_counter()
        it = iter(pipeline.make_train_dataset(cfg, tok, global_batch_size=int(batch), seed=seed, split=split))
        first = next(it)
        t1 = time.perf_counter()
        valid = 0.0
        for _ in range(steps):
            b = next(it)
            valid += float(b["valid"].sum())
        dt = time.perf_counter() - t1
        out["pipeline"][f"threads={t}"] = {
            "images_per_s": round(steps * batch / dt, 1), "seconds": round(dt, 3),
            "first_batch_s": round(t1 - t0, 3), "valid_fraction": round(valid / (steps * batch), 4),
            "batch_shape": list(first["images"].shape),
        }
        del it

    # Raw: read, decode, resize alone, in this thread.
    source = pipeline.open_split(cfg, split)
    sizes = tfds_shapes.record_sizes(source, split)
    ids = buckets_lib.assign_buckets(sizes[:, 0], sizes[:, 1], settings.buckets)
    m = min(len(source), steps * int(batch))
    idx = np.random.default_rng(seed).permutation(len(source))[:m]
    t_read = t_dec = t_res = 0.0
    nbytes = 0
    for i in idx:
        a = time.perf_counter()
        rec = source[int(i)]
        b = time.perf_counter()
        img = pipeline.decode_image(rec.get("image"))
        c = time.perf_counter()
        if img is not None:
            buckets_lib.resize_crop(img, settings.buckets[ids[i]])
        d = time.perf_counter()
        t_read, t_dec, t_res = t_read + b - a, t_dec + c - b, t_res + d - c
        v = rec.get("image")
        nbytes += len(v) if isinstance(v, (bytes, bytearray)) else int(getattr(v, "nbytes", 0))
    out["raw"] = {
        "images": int(m),
        "read_per_s": round(m / t_read, 1), "decode_per_s": round(m / t_dec, 1),
        "resize_crop_per_s": round(m / t_res, 1), "decode_resize_per_s": round(m / (t_dec + t_res), 1),
        "mean_kb": round(nbytes / max(1, m) / 1024, 1),
        "mean_size": [int(sizes[idx, 0].mean()), int(sizes[idx, 1].mean())] if m else [0, 0],
    }
    return out


def make_synthetic_folder(root: str | os.PathLike, n: int, size: tuple[int, int] = (256, 256), *,
                          seed: int = 0, quality: int = 90, noise: float = 8.0) -> tuple[str, str]:
    """``n`` JPEGs (shapes scenes over a gradient with a little noise, so they compress like photos)
    in ``root/images/<k // 1000>/`` and ``root/captions.jsonl``; returns (images_dir, captions)."""
    from PIL import Image

    from lens_jax.data import shapes

    root = os.path.abspath(root)
    images = os.path.join(root, "images")
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    with open(os.path.join(root, "captions.jsonl"), "w") as f:
        for k in range(n):
            scene = shapes.sample_scene(seed, k)
            img = shapes.render(scene, w, h, supersample=1).astype(np.float32)
            grad = (xx / w * rng.uniform(-40, 40) + yy / h * rng.uniform(-40, 40))[..., None]
            img = np.clip(img + grad + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
            rel = f"{k // 1000:03d}/img{k:06d}.jpg"
            os.makedirs(os.path.join(images, os.path.dirname(rel)), exist_ok=True)
            Image.fromarray(img).save(os.path.join(images, rel), format="JPEG", quality=quality)
            f.write(json.dumps({"key": rel, "dense_caption": shapes.dense_caption(scene),
                                "short_caption": shapes.short_caption(scene), "width": w, "height": h}) + "\n")
    return images, os.path.join(root, "captions.jsonl")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lens_jax.bench.read", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="a dataset build directory (read as data.source=tfds)")
    src.add_argument("--config", help="a run config; its data section is read")
    src.add_argument("--synthetic", type=int, help="build a folder of this many JPEGs first, then read it")
    p.add_argument("--size", default="256x256", help="--synthetic: WxH of the images")
    p.add_argument("--keep", default=None, help="--synthetic: build here (kept, reused if built) instead of a temp dir")
    p.add_argument("--buckets", default=None, help="WxH buckets (default: the config's, or --size)")
    p.add_argument("--n", type=int, default=1024, help="images timed per setting")
    p.add_argument("--threads", default="0,2", help="Grain worker threads to try, comma-separated")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--split", default="train")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="--config override")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    threads = [int(t) for t in args.threads.split(",") if t.strip()]

    from lens_jax.data import buckets as buckets_lib

    tmp = None
    extra: dict[str, Any] = {}
    if args.config:
        from lens_jax import config as config_lib

        overrides = config_lib.parse_overrides(args.set)
        data: Any = config_lib.load_config(args.config, overrides)
        buckets = args.buckets
    elif args.synthetic:
        (w, h), = buckets_lib.parse_sizes(args.size, field="--size")
        base = args.keep or tempfile.mkdtemp(prefix="lens_bench_read_")
        tmp = None if args.keep else base
        out = os.path.join(base, "build")
        from lens_jax.data import tfds_folder

        t0 = time.perf_counter()
        if not os.path.exists(os.path.join(out, "lens_params.json")):
            os.makedirs(base, exist_ok=True)
            images, captions = make_synthetic_folder(base, args.synthetic, (w, h))
            t1 = time.perf_counter()
            res = tfds_folder.build_image_folder_dataset(images, captions, out, eval_count=0)
            extra["build"] = {"images": args.synthetic, "make_folder_s": round(t1 - t0, 2),
                              "build_s": round(time.perf_counter() - t1, 2), "counts": res.counts}
        data = out
        buckets = args.buckets or f"{w}x{h}"
    else:
        data, buckets = args.data, args.buckets
    try:
        result = bench_read(data, buckets, args.n, threads, batch=args.batch, prefetch=args.prefetch,
                            split=args.split)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    result.update(extra)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
