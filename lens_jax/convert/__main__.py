"""python -m lens_jax.convert {import,export,verify} ...

  import --kind {lens-dit,gpt-oss,flux2-vae} --src PATH --dst DIR [--dtype keep|bf16|fp16|fp32]
         [--selected-layers 5,11,17,23] [--config CONFIG.json] [--overwrite]
      PATH: the component folder (config.json + *.safetensors [+ index json]), one .safetensors file
      next to its config.json, or the whole released pipeline folder (then transformer/,
      text_encoder/ or vae/ is used). DIR: a converted directory (lens_jax.json + Orbax checkpoint),
      usable as --config.init_from=DIR (lens-dit) or text_encoder.weights=DIR (gpt-oss).
  export --src DIR --dst PATH [--kind ...] [--dtype bf16|fp16|fp32] [--mxfp4] [--format NAMING]
         [--max-shard-size 5GB] [--step N] [--ema] [--overwrite]
      DIR: a converted directory or a training workdir (its checkpoints/ and config.json).
      Default dtype: each tensor's dtype in the imported checkpoint, else that of the stored weights.
      --format: gpt-oss transformers|original, flux2-vae diffusers|bfl (default: as imported).
      --mxfp4: gpt-oss experts as blocks/scales (the imported scales are reused where they fit).
  verify --kind ... --src TORCH_PATH [--dst FLAX_DIR] [--atol 1e-4] [--rtol 1e-4] [--seq-len N] [--seed 0]
      Prints per output the max abs / max relative error and `verify <kind>: max_abs=<x> OK|FAIL`;
      exit code 1 on FAIL. Needs torch (`pip install -e .[test]`).
"""

from __future__ import annotations

import argparse
import sys

KINDS = ("lens-dit", "gpt-oss", "flux2-vae")


def _layers(text: str) -> list[int]:
    return [int(t) for t in text.replace(" ", "").split(",") if t]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lens_jax.convert", description="Checkpoint conversion for lens_jax.",
                                epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="official PyTorch safetensors -> converted lens_jax directory")
    imp.add_argument("--kind", required=True, choices=KINDS)
    imp.add_argument("--src", required=True)
    imp.add_argument("--dst", required=True)
    imp.add_argument("--dtype", default="keep", help="stored dtype: keep (the source's), bf16, fp16 or fp32")
    imp.add_argument("--selected-layers", type=_layers, default=None,
                     help="gpt-oss: layers whose outputs the encoder returns (default: the pipeline's, else 5,11,17,23)")
    imp.add_argument("--config", default=None,
                     help="a config.json to use instead of the one next to the weights (e.g. for a BFL ae.safetensors)")
    imp.add_argument("--overwrite", action="store_true")

    exp = sub.add_parser("export", help="converted directory or training workdir -> official PyTorch layout")
    exp.add_argument("--kind", choices=KINDS, default=None)
    exp.add_argument("--src", required=True)
    exp.add_argument("--dst", required=True)
    exp.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: as imported, else as stored)")
    exp.add_argument("--mxfp4", action="store_true", help="gpt-oss: write the expert weights as MXFP4 blocks/scales")
    exp.add_argument("--format", dest="fmt", default=None, help="naming scheme (default: as imported): gpt-oss transformers|original, flux2-vae diffusers|bfl")
    exp.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB; larger outputs get an index json")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    exp.add_argument("--ema", action="store_true", help="training workdir: export the EMA weights")
    exp.add_argument("--overwrite", action="store_true")

    ver = sub.add_parser("verify", help="PyTorch reference vs Flax port on the same random inputs")
    ver.add_argument("--kind", required=True, choices=KINDS)
    ver.add_argument("--src", required=True)
    ver.add_argument("--dst", default=None, help="a converted directory (default: import --src on the fly)")
    ver.add_argument("--atol", type=float, default=1e-4)
    ver.add_argument("--rtol", type=float, default=1e-4)
    ver.add_argument("--seq-len", type=int, default=None)
    ver.add_argument("--seed", type=int, default=0)
    ver.add_argument("--config", default=None, help="config.json for the on-the-fly import (as for import)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from lens_jax.convert.common import ConvertError

    try:
        if args.command == "import":
            from lens_jax.convert.importer import import_checkpoint

            import_checkpoint(args.kind, args.src, args.dst, dtype=args.dtype, selected_layers=args.selected_layers,
                              config=args.config, overwrite=args.overwrite)
            return 0
        if args.command == "export":
            from lens_jax.convert.exporter import export_checkpoint

            export_checkpoint(args.src, args.dst, kind=args.kind, dtype=args.dtype, mxfp4=args.mxfp4, fmt=args.fmt,
                              max_shard_size=args.max_shard_size, step=args.step, ema=args.ema, overwrite=args.overwrite)
            return 0
        from lens_jax.convert.verify import verify

        ok = verify(args.kind, args.src, args.dst, seed=args.seed, atol=args.atol, rtol=args.rtol, seq_len=args.seq_len,
                    config=args.config)
        return 0 if ok else 1
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
