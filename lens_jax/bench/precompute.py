"""Time the precompute (python -m lens_jax.data.precompute): images/s through decode, resize, codec
encode, tokenize and text-encode of both captions, and the ArrayRecord writes.

    python -m lens_jax.bench precompute --config configs/tiny.py [--images 512] [--batch 32]
        [--resolution WxH] [--set FIELD=VALUE ...]

The dataset is the procedural shapes set, rendered at `--resolution` (default: the config's first
bucket) with `--images` train records, built in a temporary directory before the clock starts (as
are the encoder and codec weights). Reported: `images_per_s` over the whole encode loop (first
batch, which compiles, included) and `images_per_s_steady` (first batch of each bucket excluded).
`--set` values are parsed as JSON when they parse (`--set 'codec.vae={"block_out_channels": [32, 64]}'`),
else as numbers / booleans / strings.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import tempfile

import jax


def bench_precompute(cfg, *, images: int, batch: int | None, resolution: str | None, records_per_shard: int = 256,
                     features_dtype: str = "bfloat16", work_dir: str | None = None) -> dict:
    from lens_jax.data import pipeline
    from lens_jax.data.precompute import precompute
    from lens_jax.models.codec import codec_geometry

    size = resolution or cfg.data.buckets.split(",")[0]
    w, h = (int(v) for v in size.lower().split("x"))
    own = work_dir is None
    root = pathlib.Path(tempfile.mkdtemp(prefix="lens_bench_precompute_") if own else work_dir)
    try:
        cfg.data.source = "shapes"
        cfg.data.dir = str(root / "data")
        cfg.data.num_train = int(images)
        cfg.data.num_eval = 0
        cfg.data.render_sizes = f"{w}x{h}"
        cfg.data.buckets = f"{w}x{h}"
        pipeline.dataset_dir(cfg.data)  # build the dataset before timing
        out = root / "precomputed"
        shutil.rmtree(out, ignore_errors=True)
        r = precompute(cfg, out, batch_size=batch, records_per_shard=records_per_shard, features_dtype=features_dtype,
                       progress=False)
        f, channels = codec_geometry(cfg.codec)
        size_bytes = sum(p.stat().st_size for p in out.rglob("*.array_record"))
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "resolution": f"{w}x{h}",
        "codec": cfg.codec.kind,
        "vae": dict(cfg.codec.vae) if cfg.codec.kind == "flux2" else None,
        "latent_tokens": (h // f) * (w // f),
        "latent_channels": channels,
        "text_encoder_layers": int(dict(cfg.text_encoder.model).get("num_hidden_layers", 0)) or None,
        "max_text_len": int(cfg.data.max_text_len),
        "batch": r["batch_size"],
        "images": r["images"],
        "seconds": r["seconds"],
        "images_per_s": r["images_per_s"],
        "images_per_s_steady": r["images_per_s_after_first_batch"],
        "first_batch_s": r["first_batches_s"],
        "bytes_per_image": size_bytes / max(1, r["images"]),
        "features_dtype": features_dtype,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lens_jax.bench precompute")
    parser.add_argument("--config", required=True)
    parser.add_argument("--images", type=int, default=512, help="train records to precompute")
    parser.add_argument("--batch", type=int, default=None, help="images per encode call (default: global batch)")
    parser.add_argument("--resolution", default=None, help="WxH (default: the config's first bucket)")
    parser.add_argument("--records-per-shard", type=int, default=256)
    parser.add_argument("--features-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--work-dir", default=None, help="keep the dataset and output here (default: a temp dir)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override (repeatable)")
    args = parser.parse_args(argv)

    from lens_jax import config as config_lib

    overrides = config_lib.parse_overrides(args.set)
    cfg = config_lib.load_config(args.config, overrides)
    result = bench_precompute(cfg, images=args.images, batch=args.batch, resolution=args.resolution,
                              records_per_shard=args.records_per_shard, features_dtype=args.features_dtype,
                              work_dir=args.work_dir)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    main()
