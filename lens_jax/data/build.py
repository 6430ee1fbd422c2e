"""python -m lens_jax.data.build --images DIR --captions FILE --out DIR [--eval-count N] [--name NAME]

Builds a TFDS dataset (ArrayRecord) from an image folder and its captions (the captioner's
``captions.jsonl`` or your own JSONL; without ``--captions``, ``<image>.txt`` next to each image), prints
the counts and the flags that train on it. Skipped files are listed with the reason in
``OUT/build_report.json``. See :mod:`lens_jax.data.tfds_folder` for the layout and the rules.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from lens_jax.data import buckets as buckets_lib


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lens_jax.data.build", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="the image folder (searched recursively)")
    p.add_argument("--captions", default=None,
                   help="captions JSONL (keys: key|file|path + dense_caption|caption|text [+ short_caption]); "
                        "default: <image>.txt files next to the images")
    p.add_argument("--out", required=True, help="output directory (replaced if it holds an earlier build)")
    p.add_argument("--eval-count", type=int, default=64, help="held-out eval records (default 64; 0: none)")
    p.add_argument("--name", default="lens_image_folder", help="dataset name (the builder directory's name)")
    p.add_argument("--workers", type=int, default=None, help="reader threads (default: up to 8 cores)")
    p.add_argument("--no-verify", action="store_true",
                   help="read image headers only (faster; truncated files then surface as invalid records "
                        "during training instead of being skipped here)")
    p.add_argument("--buckets", default="",
                   help="WxH buckets, e.g. 1024x1024,1216x832,832x1216: print how many records each gets")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    bucket_list = buckets_lib.parse_sizes(args.buckets, field="--buckets") if args.buckets else None
    logging.basicConfig(level=logging.WARNING)
    from lens_jax.data import tfds_folder  # tensorflow_datasets is slow to import: after parsing

    if args.quiet:
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
    try:
        result = tfds_folder.build_image_folder_dataset(
            args.images, args.captions, args.out, eval_count=args.eval_count, name=args.name,
            verify=not args.no_verify, workers=args.workers, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c, rep = result.counts, result.report
    print(f"dataset:   {result.builder_dir}")
    print(f"images:    {c['image_files']} files, {c['captions']} captions ({c['caption_lines']} lines, "
          f"{c['duplicate_caption_keys']} repeated keys)")
    print(f"records:   train {c['train']}, eval {c['eval']} ({c['reencoded']} re-encoded as PNG)")
    reasons = ", ".join(f"{n} {r}" for r, n in rep["skipped_by_reason"].items())
    print(f"skipped:   {c['skipped']}" + (f" ({reasons})" if reasons else ""))
    print(f"captions without an image: {c['captions_without_image']}")
    print(f"report:    {result.report_path}")
    if bucket_list:
        import numpy as np

        table = np.load(os.path.join(result.builder_dir, "lens_sizes-train.npy"))
        ids = buckets_lib.assign_buckets(table[:, 0], table[:, 1], bucket_list)
        print("buckets (train): " + ", ".join(f"{w}x{h}: {int((ids == b).sum())}"
                                              for b, (w, h) in enumerate(bucket_list)))
    flags = f"--config.data.source=tfds --config.data.dir={shlex.quote(result.out_dir)}"
    if bucket_list:
        flags += f" --config.data.buckets={buckets_lib.format_sizes(bucket_list)}"
    print("train on it with:")
    print(f"  python -m lens_jax.train --config CONFIG --workdir WORKDIR {flags}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
