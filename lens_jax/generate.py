"""python -m lens_jax.generate --weights DIR --prompt "..." --out PATH [options]

Text-to-image from a training workdir or a converted pipeline folder (both layouts are described in
lens_jax/sample/pipeline.py). Examples:

    python -m lens_jax.generate --weights runs/demo --prompt "a red circle and a blue square" \
        --width 32 --height 32 --out runs/demo/generated.png
    python -m lens_jax.generate --weights lens_converted --prompt-file prompts.txt --preset turbo \
        --width 1472 --height 736 --num-images 2 --out outputs/

Sizes: width and height are multiples of 16 (the codec's pixels per token: the pixel codec's patch
for the small models) between 256 and 2048; below 256 only with the pixel codec or --allow-small.
An invalid size is an error naming the nearest valid one.

--out: a .png file when exactly one image is made, else a directory (created) that receives
<prompt index>_<image index>_seed<seed>.png. Every PNG carries its prompt, seed and settings as PNG
text chunks (keys prompt, negative_prompt, seed, image_index, width, height, steps, guidance, preset,
weights, and `lens_jax` with all of them as JSON).

--reasoner MODEL [--reasoner-base-url URL]: an LLM (OpenAI-compatible endpoint) rewrites each prompt
into a dense description before encoding (lens_jax.sample.reasoner); on failure the prompt is kept.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lens_jax.generate", description="Generate images with Lens.",
                                epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a training workdir or a converted pipeline folder")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", default=None, help="a text file with one prompt per line (blank lines skipped)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--width", type=int, default=None, help="default: the weights' default size")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--preset", default="lens", choices=("lens", "turbo", "base"),
                   help="lens: 20 steps, guidance 5; turbo: 4 steps, guidance 1; base: 50 steps, guidance 5")
    p.add_argument("--steps", type=int, default=None, help="default: the preset's")
    p.add_argument("--guidance", type=float, default=None, help="default: the preset's (1 = no unconditional pass)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per compiled batch")
    p.add_argument("--out", required=True, help="a .png file for one image, else a directory")
    p.add_argument("--allow-small", action="store_true", help="allow sides below 256 with any codec")
    p.add_argument("--no-ema", action="store_true", help="training workdir: use the raw weights, not the EMA")
    p.add_argument("--reasoner", default=None, metavar="MODEL", help="rewrite prompts with this LLM first")
    p.add_argument("--reasoner-base-url", default=None, metavar="URL")
    p.add_argument("--reasoner-system-prompt", default=None, metavar="FILE")
    p.add_argument("--reasoner-timeout", type=float, default=30.0, metavar="S", help="per request (retried 3 times)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        lines = pathlib.Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        prompts += [ln.strip() for ln in lines if ln.strip()]
    return prompts


def output_paths(out: str, num_prompts: int, num_images: int, seed: int) -> list[pathlib.Path]:
    out_path = pathlib.Path(out)
    total = num_prompts * num_images
    if total == 1 and not out_path.is_dir() and out_path.suffix:
        return [out_path]
    if out_path.suffix.lower() == ".png" and not out_path.is_dir():
        raise ValueError(f"--out {out} is a .png file, but {total} images are made: give a directory")
    return [out_path / f"{i:03d}_{j:02d}_seed{seed}.png" for i in range(num_prompts) for j in range(num_images)]


def save_png(path: pathlib.Path, image, info: dict) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for k, v in info.items():
        meta.add_text(k, str(v))
    meta.add_text("lens_jax", json.dumps(info, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, pnginfo=meta)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prompts = read_prompts(args)
    if not prompts:
        parser.error("give --prompt and/or --prompt-file")
    if args.num_images < 1 or args.batch_size < 1:
        parser.error("--num-images and --batch-size must be >= 1")
    try:
        paths = output_paths(args.out, len(prompts), args.num_images, args.seed)
    except ValueError as e:
        parser.error(str(e))

    from lens_jax.sample.pipeline import LensPipeline, check_size
    from lens_jax.sample.presets import get_preset

    pipe = LensPipeline.from_dir(args.weights, use_ema=not args.no_ema)
    width = args.width or pipe.default_size[0]
    height = args.height or pipe.default_size[1]
    try:
        check_size(width, height, pipe.codec, args.allow_small)
    except ValueError as e:
        parser.error(str(e))
    preset = get_preset(args.preset)
    steps = preset.steps if args.steps is None else args.steps
    guidance = preset.guidance if args.guidance is None else args.guidance

    encoded = prompts
    if args.reasoner:
        from lens_jax.sample.reasoner import rewrite_prompt

        encoded = [rewrite_prompt(q, model=args.reasoner, base_url=args.reasoner_base_url,
                                  system_prompt_file=args.reasoner_system_prompt, timeout=args.reasoner_timeout)
                   for q in prompts]

    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts) * args.num_images, desc="generate", unit="img", disable=args.quiet,
               dynamic_ncols=True)
    k = 0
    for start in range(0, len(prompts), args.batch_size):
        chunk = encoded[start:start + args.batch_size]
        images = pipe.generate(chunk, negative_prompt=args.negative_prompt, width=width, height=height, steps=steps,
                               guidance=guidance, seed=args.seed, num_images=args.num_images, preset=args.preset,
                               allow_small=args.allow_small)
        for r, image in enumerate(images):
            i, j = start + r // args.num_images, r % args.num_images
            info = {"prompt": prompts[i], "negative_prompt": args.negative_prompt, "seed": args.seed,
                    "image_index": j, "width": width, "height": height, "steps": steps, "guidance": guidance,
                    "preset": args.preset, "weights": str(pathlib.Path(args.weights).absolute())}
            if encoded[i] != prompts[i]:
                info.update(encoded_prompt=encoded[i], reasoner=args.reasoner)
            save_png(paths[k], image, info)
            k += 1
        bar.set_postfix({s: f"{v:.2f}s" for s, v in pipe.timings.items()})
        bar.update(len(images))
    bar.close()
    print(paths[0] if len(paths) == 1 else f"{len(paths)} images in {paths[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
