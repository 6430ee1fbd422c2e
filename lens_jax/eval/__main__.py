"""python -m lens_jax.eval --weights WORKDIR --out DIR [options]

ShapesEval: GenEval's six tasks (single_object, two_objects, counting, colors, position, color_attr)
on held-out procedural scenes, scored from the pixels by a programmatic detector with GenEval's rules.

    python -m lens_jax.eval --weights runs/demo --out runs/demo/eval --per-task 50 --prompt-style both
    python -m lens_jax.eval --ground-truth --width 64 --height 64 --out /tmp/gt_eval   # checks the scorer

The scene world (shapes, colours, backgrounds, sizes) is the training run's ``data.scene`` (from
WORKDIR/config.json) unless --scene-json is given. Writes to DIR: items.json, results_<style>.json
(one entry per image: prompt, seed, pass/fail, reason, detections), summary.json (per style: task
means, the overall score = mean of task means, skipped tasks, notes, how many prompts were longer than
the model's text length and so truncated) and grid_<style>.png (a few items
per task: generated | ground truth, framed green = pass, red = fail). Prints a table per style.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lens_jax.eval", description="ShapesEval (GenEval on shapes).",
                                epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="a training workdir or a converted pipeline folder")
    p.add_argument("--ground-truth", action="store_true",
                   help="score the items' ground-truth renders instead of generating (no weights needed)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--per-task", type=int, default=50, help="items per task (default 50)")
    p.add_argument("--prompt-style", default="short", choices=("short", "dense", "both"))
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="items and noise seeds")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--width", type=int, default=None, help="default: the weights' default size (64 for --ground-truth)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64, help="prompts per compiled batch")
    p.add_argument("--no-ema", action="store_true", help="training workdir: the raw weights, not the EMA")
    p.add_argument("--scene-json", default=None, help="ShapesConfig overrides as JSON (default: the run's data.scene)")
    p.add_argument("--colors-in-prompts", choices=("always", "checked"), default="always",
                   help="always: every short prompt names colours (as training captions do); checked: only the "
                        "colors/color_attr prompts (GenEval's wording)")
    p.add_argument("--grid-per-task", type=int, default=4, help="items per task in the grid PNG (0: no grid)")
    return p


def _scene_config(args):
    from lens_jax.eval.tasks import scene_config_from_dict

    if args.scene_json:
        return scene_config_from_dict(json.loads(args.scene_json))
    if args.weights and (pathlib.Path(args.weights) / "config.json").is_file():
        cfg = json.loads((pathlib.Path(args.weights) / "config.json").read_text())
        return scene_config_from_dict((cfg.get("data") or {}).get("scene"))
    return None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.weights and not args.ground_truth:
        parser.error("give --weights (or --ground-truth to score the ground-truth renders)")
    if args.per_task < 1 or args.images_per_prompt < 1 or args.batch_size < 1:
        parser.error("--per-task, --images-per-prompt and --batch-size must be >= 1")

    from lens_jax.eval import runner, scoring, tasks

    scene_config = _scene_config(args)
    items = tasks.make_eval_items(args.per_task, seed=args.seed, scene_config=scene_config,
                                  colors_in_prompts=args.colors_in_prompts == "always")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner.write_json(out / "items.json", [it.to_dict() for it in items])

    if args.ground_truth:
        width, height = args.width or 64, args.height or 64
        truncated = lambda style: 0
        make_fn = lambda style: runner.ground_truth_generate_fn(items, width, height, style, args.images_per_prompt,
                                                                 args.seed)
        source = "ground truth"
    else:
        from lens_jax.sample.pipeline import LensPipeline

        pipe = LensPipeline.from_dir(args.weights, use_ema=not args.no_ema)
        width, height = args.width or pipe.default_size[0], args.height or pipe.default_size[1]
        fn = runner.pipeline_generate_fn(pipe, width, height, args.steps, args.guidance, batch_size=args.batch_size)
        make_fn = lambda style: fn
        source = pipe.source

        from lens_jax.text import prompt as prompt_lib

        def truncated(style):  # prompts longer than the model's text length lose their tail
            lengths = prompt_lib.tokenize_prompts(pipe.tokenizer, [it.prompt(style) for it in items], 1 << 16)[1].sum(-1)
            return int((lengths > pipe.max_text_len).sum())

    styles = ("short", "dense") if args.prompt_style == "both" else (args.prompt_style,)
    summary_all = {"source": source, "width": width, "height": height, "steps": args.steps,
                   "guidance": args.guidance, "seed": args.seed, "per_task": args.per_task,
                   "images_per_prompt": args.images_per_prompt,
                   "scene_config": None if scene_config is None else scene_config.__dict__, "styles": {}}
    for style in styles:
        t0 = time.perf_counter()
        images = runner.generate_images(make_fn(style), items, width=width, height=height, prompt_style=style,
                                        images_per_prompt=args.images_per_prompt, seed=args.seed)
        t1 = time.perf_counter()
        results = runner.score_images(images, items, prompt_style=style, images_per_prompt=args.images_per_prompt,
                                      seed=args.seed)
        summary = scoring.summarize(results, scene_config)
        summary.update(generate_s=round(t1 - t0, 2), score_s=round(time.perf_counter() - t1, 2),
                       prompts_truncated=truncated(style))
        summary_all["styles"][style] = summary
        runner.write_json(out / f"results_{style}.json", results)
        if args.grid_per_task > 0:
            runner.save_grid(out / f"grid_{style}.png", images, results, items, per_task=args.grid_per_task)
        print(f"== {style} prompts ({source}, {width}x{height}, {len(images)} images)")
        print(scoring.format_summary(summary))
        if summary["prompts_truncated"]:
            print(f"warning: {summary['prompts_truncated']} of {len(items)} {style} prompts exceed the model's "
                  f"text length and were truncated")
    runner.write_json(out / "summary.json", summary_all)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
