"""The caption-density ablation: one toy trained on dense, 50/50 mixed and short captions at equal
training FLOPs, each scored by ShapesEval at the same FLOPs checkpoints.

Equal FLOPs means equal *executed* model FLOPs: per step, the DiT's training FLOPs plus the frozen text
encoder's forward over the padded text length each arm trains with (lens_jax.budget.flops), so the
text tokens a caption style adds are paid for with fewer steps. Each arm's text length is the longest
caption of its kind, rounded up to 8 (at most 512); the mixed arm pads
every row to the dense length (no sequence packing), which is what it costs in this trainer.

Resumable: each arm trains in ``OUT/arms/<arm>/`` (a normal training workdir: rerunning resumes from
its last checkpoint) and each evaluation is cached in ``OUT/arms/<arm>/eval/step_<n>.json``.
Outputs: ``OUT/report.md``, ``OUT/scores.json`` and the PNG plots of lens_jax.budget.ablation_report.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pathlib
from typing import Sequence

import numpy as np

ARMS = {"dense": "dense", "mix": "mix", "short": "short"}
PROMPT_STYLES = ("short", "dense")
DEFAULT_CONFIG = "configs/caption_ablation.py"
# Sized so the three arms train in ~40 minutes on a 2-core CPU (see README "Caption density").
DEFAULT_BUDGET_FLOPS = 4.5e13
MAX_TEXT_LEN = 512


@dataclasses.dataclass(frozen=True)
class ArmPlan:
    name: str
    caption: str
    max_text_len: int          # padded text length the arm trains with (tokens)
    mean_text_tokens: float    # mean real caption length of this arm's caption mix (tokens)
    image_tokens: int
    flops_per_sample: float    # DiT train + frozen encoders, per sample
    global_batch: int
    steps: int
    checkpoint_every: int

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_sample * self.global_batch

    @property
    def eval_steps(self) -> list[int]:
        return list(range(self.checkpoint_every, self.steps + 1, self.checkpoint_every))

    @property
    def text_image_ratio(self) -> float:
        return self.mean_text_tokens / self.image_tokens

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "flops_per_step": self.flops_per_step, "eval_steps": self.eval_steps,
                "text_image_ratio": self.text_image_ratio, "total_flops": self.flops_per_step * self.steps}


def caption_token_lengths(cfg, n: int = 512) -> dict[str, np.ndarray]:
    """Token counts of the dense and short captions of the first ``n`` training records."""
    from lens_jax.data import pipeline
    from lens_jax.train.loop import load_tokenizer

    tok = load_tokenizer(cfg, None)
    source = pipeline.open_split(cfg.data, "train")
    out: dict[str, list[int]] = {"dense": [], "short": []}
    for i in range(min(n, len(source))):
        record = source[i]
        for kind in out:
            text = pipeline._as_text(record.get(f"{kind}_caption")).strip()
            if text:
                out[kind].append(len(tok(text)["input_ids"]))
    for kind, values in out.items():
        if not values:
            raise ValueError(f"data: no {kind} captions in the first {n} training records of {cfg.data.source!r}")
    return {k: np.asarray(v) for k, v in out.items()}


def _image_tokens(cfg) -> tuple[int, int, int]:
    from lens_jax.data.buckets import parse_sizes

    width, height = parse_sizes(cfg.data.buckets, field="data.buckets")[0]
    per_token = int(cfg.codec.patch) if cfg.codec.kind == "pixel" else 16
    return width, height, (width // per_token) * (height // per_token)


def sample_flops(cfg, width: int, height: int, text_tokens: int) -> float:
    from lens_jax.budget import flops

    return float(flops.train_sample_flops(cfg, width, height, text_tokens)["total"])


def arm_config(cfg, plan: ArmPlan):
    c = copy.deepcopy(cfg)
    c.data.caption = plan.caption
    c.data.max_text_len = plan.max_text_len
    c.total_steps = plan.steps
    c.checkpoint_every = plan.checkpoint_every
    c.keep_checkpoints = len(plan.eval_steps) + 1
    c.sample_every = 0
    return c


def plan_arms(cfg, budget_flops: float, *, eval_points: int = 4, arms: Sequence[str] = tuple(ARMS)) -> list[ArmPlan]:
    """Steps per arm so that every arm spends (just under) ``budget_flops`` training FLOPs."""
    if eval_points < 1:
        raise ValueError(f"--eval-points: must be >= 1, got {eval_points}")
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise ValueError(f"--arms: unknown {bad or list(arms)}; choose from {list(ARMS)}")
    lengths = caption_token_lengths(cfg)
    # The arm, not the config, decides the caption style, so its text length follows its captions (the config's
    # data.max_text_len may be sized for short captions, as in configs/tiny.py); 512 is the official maximum.
    offset = int(cfg.text_encoder.offset)
    text_len = {k: min(MAX_TEXT_LEN, 8 * math.ceil((int(v.max()) + offset) / 8)) for k, v in lengths.items()}
    ratio = float(cfg.data.dense_ratio)
    width, height, image_tokens = _image_tokens(cfg)
    batch = int(cfg.data.global_batch_size)
    plans = []
    for arm in arms:
        caption = ARMS[arm]
        if caption == "mix":
            max_len = max(text_len.values())
            mean = ratio * lengths["dense"].mean() + (1 - ratio) * lengths["short"].mean()
        else:
            max_len = text_len[caption]
            mean = float(lengths[caption].mean())
        per_sample = sample_flops(cfg, width, height, max_len - offset)
        interval = int(budget_flops // (per_sample * batch * eval_points))
        if interval < 1:
            need = per_sample * batch * eval_points
            raise ValueError(f"--budget-flops {budget_flops:.3g} buys less than one step per evaluation point for "
                             f"arm {arm!r} ({per_sample * batch:.3g} FLOPs per step x {eval_points} points): "
                             f"use at least {need:.3g}")
        plans.append(ArmPlan(name=arm, caption=caption, max_text_len=max_len, mean_text_tokens=float(mean),
                             image_tokens=image_tokens, flops_per_sample=per_sample, global_batch=batch,
                             steps=interval * eval_points, checkpoint_every=interval))
    return plans


def _scene_config(cfg):
    from lens_jax.data.pipeline import validate_data_config

    return validate_data_config(cfg.data).scene_config


def evaluate_checkpoint(cfg, workdir: pathlib.Path, step: int, items, *, width: int, height: int,
                        prompt_styles: Sequence[str], eval_text_len: int, seed: int) -> dict:
    """ShapesEval scores of one checkpoint (EMA weights when the run keeps them), cached on disk."""
    cache = workdir / "eval" / f"step_{step}.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        if set(prompt_styles) <= set(cached["styles"]) and cached.get("num_items") == len(items):
            return cached
    from lens_jax import eval as shapes_eval
    from lens_jax.sample.pipeline import LensPipeline

    pipe = LensPipeline.from_dir(workdir, step=step, max_text_len=eval_text_len)
    generate = shapes_eval.pipeline_generate_fn(pipe, width, height, int(cfg.sample.steps), float(cfg.sample.guidance))
    styles = {}
    for style in prompt_styles:
        images = shapes_eval.generate_images(generate, items, width=width, height=height, prompt_style=style, seed=seed)
        results = shapes_eval.score_images(images, items, prompt_style=style, seed=seed)
        styles[style] = {"summary": shapes_eval.summarize(results),
                         "items": [{k: r[k] for k in ("uid", "task", "passed", "reason")} for r in results]}
        shapes_eval.save_grid(workdir / "eval" / f"step_{step}_{style}.png", images, results, items)
    out = {"step": step, "styles": styles, "num_items": len(items)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, cache)
    return out


def run_ablation(cfg, out_dir: str | os.PathLike, budget_flops: float, *, eval_points: int = 4, per_task: int = 12,
                 arms: Sequence[str] = tuple(ARMS), prompt_styles: Sequence[str] = PROMPT_STYLES, eval_seed: int = 0,
                 progress: bool = True) -> dict:
    """Train every arm to the budget, evaluate each checkpoint, write scores.json, report.md and plots."""
    from lens_jax import eval as shapes_eval
    from lens_jax.budget import ablation_report
    from lens_jax.config import validate
    from lens_jax.train.loop import train
    from lens_jax.train.metrics import read_metrics

    validate(cfg)
    bad = [s for s in prompt_styles if s not in PROMPT_STYLES]
    if bad or not prompt_styles:
        raise ValueError(f"--prompt-styles: unknown {bad or list(prompt_styles)}; choose from {list(PROMPT_STYLES)}")
    out = pathlib.Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    plans = plan_arms(cfg, budget_flops, eval_points=eval_points, arms=arms)
    width, height, _ = _image_tokens(cfg)
    eval_text_len = max(p.max_text_len for p in plans)
    items = shapes_eval.make_eval_items(per_task, seed=eval_seed, scene_config=_scene_config(cfg))
    ground_truth = shapes_eval.summarize(shapes_eval.score_images(
        shapes_eval.render_ground_truth(items, width, height), items, prompt_style=prompt_styles[0], seed=eval_seed))
    # the floor: what the detector passes on images that hold no drawing at all (uniform noise, same items)
    noise = np.random.default_rng(eval_seed).integers(0, 256, (len(items), height, width, 3), dtype=np.uint8)
    floor = shapes_eval.summarize(shapes_eval.score_images(noise, items, prompt_style=prompt_styles[0], seed=eval_seed))
    (out / "plan.json").write_text(json.dumps({
        "budget_flops": budget_flops, "config": cfg.to_dict(), "arms": [p.to_dict() for p in plans],
        "eval": {"per_task": per_task, "items": len(items), "prompt_styles": list(prompt_styles),
                 "seed": eval_seed, "text_len": eval_text_len, "width": width, "height": height},
    }, indent=1, default=str))

    results = {"budget_flops": budget_flops, "arms": {}, "ground_truth": ground_truth, "noise_floor": floor,
               "eval": {"per_task": per_task, "items": len(items), "prompt_styles": list(prompt_styles),
                        "width": width, "height": height}}
    for plan in plans:
        workdir = out / "arms" / plan.name
        if progress:
            print(f"[ablate-captions] arm {plan.name}: {plan.steps} steps x {plan.flops_per_step:.3g} FLOPs "
                  f"(text {plan.max_text_len} tokens, image {plan.image_tokens})", flush=True)
        train(arm_config(cfg, plan), workdir, progress=progress)
        evals = [evaluate_checkpoint(cfg, workdir, s, items, width=width, height=height,
                                     prompt_styles=prompt_styles, eval_text_len=eval_text_len, seed=eval_seed)
                 for s in plan.eval_steps]
        losses = [(m["step"], m["loss"]) for m in read_metrics(workdir) if m.get("loss") is not None]
        results["arms"][plan.name] = {
            "plan": plan.to_dict(),
            "checkpoints": [{"step": e["step"], "flops": e["step"] * plan.flops_per_step,
                             **{style: e["styles"][style]["summary"] for style in prompt_styles}} for e in evals],
            "loss": [{"step": s, "flops": s * plan.flops_per_step, "loss": l} for s, l in losses],
        }
    (out / "scores.json").write_text(json.dumps(results, indent=1))
    ablation_report.write_report(results, out)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from lens_jax import config as config_lib

    parser = argparse.ArgumentParser(prog="python -m lens_jax.budget ablate-captions",
                                     description="dense vs mixed vs short captions at equal training FLOPs")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--budget-flops", type=float, default=DEFAULT_BUDGET_FLOPS,
                        help=f"training FLOPs per arm (default {DEFAULT_BUDGET_FLOPS:.3g})")
    parser.add_argument("--out", default="runs/caption_ablation")
    parser.add_argument("--eval-points", type=int, default=2,
                        help="evaluated checkpoints per arm, equally spaced in FLOPs (each costs ~2 CPU minutes at the default)")
    parser.add_argument("--per-task", type=int, default=12, help="ShapesEval prompts per task")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of dense,mix,short")
    parser.add_argument("--prompt-styles", default=",".join(PROMPT_STYLES),
                        help="ShapesEval prompt styles: short (GenEval-like) and/or dense (rewritten)")
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override (repeatable)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    overrides = config_lib.parse_overrides(args.set)
    cfg = config_lib.load_config(args.config, overrides)
    results = run_ablation(cfg, args.out, args.budget_flops, eval_points=args.eval_points, per_task=args.per_task,
                           arms=[a for a in args.arms.split(",") if a],
                           prompt_styles=[s for s in args.prompt_styles.split(",") if s], eval_seed=args.eval_seed,
                           progress=not args.no_progress)
    out = pathlib.Path(args.out)
    print(f"report: {out / 'report.md'}\nscores: {out / 'scores.json'}")
    for arm, r in results["arms"].items():
        final = r["checkpoints"][-1]
        print(f"  {arm:>5}: " + ", ".join(f"{s} prompts {final[s]['overall']:.3f}" for s in results["eval"]["prompt_styles"]))
    return 0
