"""python -m lens_jax.bench train --config CONFIG [--bucket WxH] [--layers N] [--batch B] [--steps S]
python -m lens_jax.bench sample --config CONFIG [--resolution WxH] [--preset lens|turbo|base]
python -m lens_jax.bench convert-memory [--layers 8] [--dtype bf16]   (peak host memory of import/export)
python -m lens_jax.bench caption [--concurrency 1,8,32] [--images N] [--latency S]   (captioner vs a local server)
python -m lens_jax.bench read ...         (dataset reader: decode + resize images/s)
python -m lens_jax.bench precompute ...   (latents + text features images/s)"""

from __future__ import annotations

import argparse
import json
import sys


SCRIPTS = {
    "convert-memory": "lens_jax.bench.convert_memory",
    "caption": "lens_jax.bench.caption",
    "read": "lens_jax.bench.read",
    "precompute": "lens_jax.bench.precompute",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SCRIPTS:  # self-contained benchmarks that parse their own flags
        import importlib

        return int(importlib.import_module(SCRIPTS[argv[0]]).main(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog="python -m lens_jax.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="time the jitted train step on random data of the real shapes")
    tr.add_argument("--config", required=True)
    tr.add_argument("--bucket", default=None, help="WxH in pixels, e.g. 1024x1024 (default: the first bucket)")
    tr.add_argument("--layers", type=int, default=None, help="override the number of blocks (fit a smaller device)")
    tr.add_argument("--batch", type=int, default=None, help="global batch (default: config.data.global_batch_size)")
    tr.add_argument("--steps", type=int, default=5)
    tr.add_argument("--warmup", type=int, default=2)
    tr.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="config override, e.g. --set model.remat=full (repeatable)")
    sa = sub.add_parser("sample", help="time sampling (text encoding, denoising, decoding) on random weights")
    sa.add_argument("--config", required=True)
    sa.add_argument("--resolution", default="1024x1024", help="WxH in pixels")
    sa.add_argument("--preset", default="lens", choices=("lens", "turbo", "base"))
    sa.add_argument("--steps", type=int, default=None, help="default: the preset's")
    sa.add_argument("--batch", type=int, default=1, help="images per batch")
    sa.add_argument("--repeats", type=int, default=2, help="timed runs after the compiling one")
    sa.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="config override (repeatable)")
    args = parser.parse_args(argv)

    from lens_jax import config as config_lib

    overrides = config_lib.parse_overrides(args.set)
    cfg = config_lib.load_config(args.config, overrides)
    if args.command == "train":
        from lens_jax.bench.train_step import bench_train

        result = bench_train(cfg, bucket=args.bucket, layers=args.layers, batch=args.batch, steps=args.steps,
                             warmup=args.warmup)
        print(json.dumps(result, indent=2))
    elif args.command == "sample":
        from lens_jax.bench.sample import bench_sample

        result = bench_sample(cfg, resolution=args.resolution, preset=args.preset, steps=args.steps,
                              batch=args.batch, repeats=args.repeats)
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
