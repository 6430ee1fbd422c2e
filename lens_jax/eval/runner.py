"""Generate the eval items' images with any sampler, score them, save results and a grid.

``generate_fn(prompts: list[str], seeds: list[int]) -> uint8 [N, H, W, 3]`` is the only contract with
the sampler: image ``i`` is the prompt ``prompts[i]`` drawn from the noise of ``seeds[i]``.
:func:`pipeline_generate_fn` builds one from a :class:`~lens_jax.sample.pipeline.LensPipeline` whose
images equal ``pipeline.generate([prompt], seed=seed)`` (image 0 of that seed), batched.

Seeds: image ``j`` of item ``i`` uses ``seed + i * images_per_prompt + j``, so a short-prompt and a
dense-prompt evaluation of the same items start every image from the same noise (a paired comparison).
"""

from __future__ import annotations

import json
import pathlib
import textwrap
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lens_jax.data import shapes
from lens_jax.eval import scoring
from lens_jax.eval.tasks import TASKS, EvalItem

GenerateFn = Callable[[list[str], list[int]], np.ndarray]
PROMPT_STYLES = ("short", "dense")


def render_ground_truth(items: Sequence[EvalItem], width: int, height: int) -> np.ndarray:
    """uint8 [N, height, width, 3]: every item's scene drawn by the dataset's renderer."""
    if not items:
        return np.zeros((0, height, width, 3), np.uint8)
    return np.stack([shapes.render(it.scene, width, height) for it in items])


def image_plan(items: Sequence[EvalItem], prompt_style: str, images_per_prompt: int = 1,
               seed: int = 0) -> list[tuple[int, int, str, int]]:
    """[(item index, image index, prompt, seed)] in item-major order."""
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    return [(i, j, it.prompt(prompt_style), int(seed) + i * images_per_prompt + j)
            for i, it in enumerate(items) for j in range(images_per_prompt)]


def generate_images(generate_fn: GenerateFn, items: Sequence[EvalItem], *, width: int, height: int,
                    prompt_style: str = "short", images_per_prompt: int = 1, seed: int = 0) -> np.ndarray:
    """uint8 [len(items) * images_per_prompt, height, width, 3] from one ``generate_fn`` call."""
    plan = image_plan(items, prompt_style, images_per_prompt, seed)
    if not plan:
        return np.zeros((0, height, width, 3), np.uint8)
    images = np.asarray(generate_fn([p for _, _, p, _ in plan], [s for *_, s in plan]))
    want = (len(plan), height, width, 3)
    if images.shape != want:
        raise ValueError(f"generate_fn returned images of shape {images.shape}, expected {want}")
    if images.dtype != np.uint8:
        raise ValueError(f"generate_fn must return uint8 images, got {images.dtype}")
    return images


def score_images(images: np.ndarray, items: Sequence[EvalItem], *, prompt_style: str = "short",
                 images_per_prompt: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """One result dict per image (see :func:`evaluate`)."""
    plan = image_plan(items, prompt_style, images_per_prompt, seed)
    if len(images) != len(plan):
        raise ValueError(f"{len(images)} images for {len(plan)} (item, image) pairs")
    results = []
    for (i, j, prompt, s), image in zip(plan, images):
        it = items[i]
        r = scoring.score_image_detailed(image, it)
        results.append({"uid": it.uid, "task": it.task, "item": i, "image_index": j, "seed": s,
                        "prompt_style": prompt_style, "prompt": prompt, "passed": r["passed"],
                        "reason": r["reason"], "spec": it.spec, "detections": r["detections"]})
    return results


def evaluate(generate_fn: GenerateFn, items: Sequence[EvalItem], *, width: int, height: int,
             prompt_style: str = "short", images_per_prompt: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """Generates every item's prompt (``images_per_prompt`` seeds each) and scores the images.

    Returns one dict per image: uid, task, item, image_index, seed, prompt_style, prompt, passed,
    reason, spec, detections. :func:`lens_jax.eval.scoring.summarize` turns them into task scores.
    """
    images = generate_images(generate_fn, items, width=width, height=height, prompt_style=prompt_style,
                             images_per_prompt=images_per_prompt, seed=seed)
    return score_images(images, items, prompt_style=prompt_style, images_per_prompt=images_per_prompt, seed=seed)


def ground_truth_generate_fn(items: Sequence[EvalItem], width: int, height: int, prompt_style: str = "short",
                             images_per_prompt: int = 1, seed: int = 0) -> GenerateFn:
    """A generate_fn returning the ground-truth render of each (prompt, seed)'s item: a perfect model.

    The item comes from the seed (:func:`image_plan`'s numbering, for the same ``images_per_prompt``
    and ``seed``), so items that share a prompt still get their own scenes; the prompt is checked.
    """

    def fn(prompts: list[str], seeds: list[int]) -> np.ndarray:
        chosen = []
        for p, s in zip(prompts, seeds):
            i = (int(s) - int(seed)) // images_per_prompt
            if not 0 <= i < len(items) or items[i].prompt(prompt_style) != p:
                raise ValueError(f"ground truth: no item for prompt {p!r} with seed {s}")
            chosen.append(items[i])
        return render_ground_truth(chosen, width, height)

    return fn


# --------------------------------------------------------------------------------------------------
# LensPipeline


def pipeline_generate_fn(pipeline, width: int | None = None, height: int | None = None, steps: int = 20,
                         guidance: float = 5.0, *, batch_size: int = 64, negative_prompt: str = "") -> GenerateFn:
    """A generate_fn on a :class:`~lens_jax.sample.pipeline.LensPipeline`.

    Prompts run in batches of ``batch_size`` (the last one padded, so every batch compiles once), all
    padded to the call's longest prompt; image ``i`` starts from the noise of
    ``pipeline.generate([prompt], seed=seeds[i])``. Size defaults to the pipeline's.
    """
    import jax
    import jax.numpy as jnp

    from lens_jax.sample.pipeline import check_size
    from lens_jax.text import prompt as prompt_lib

    width = int(width or pipeline.default_size[0])
    height = int(height or pipeline.default_size[1])
    check_size(width, height, pipeline.codec, allow_small=True)
    prompt_lib.check_offset(pipeline.tokenizer, pipeline.offset)
    guidance = float(guidance)

    def fn(prompts: list[str], seeds: list[int]) -> np.ndarray:
        prompts, seeds = list(prompts), [int(s) for s in seeds]
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            return np.zeros((0, height, width, 3), np.uint8)
        lengths = prompt_lib.tokenize_prompts(pipeline.tokenizer, prompts, 1 << 16)[1].sum(-1)
        cut = int((lengths > pipeline.max_text_len).sum())
        if cut:
            warnings.warn(f"{cut} of {len(prompts)} prompts are longer than the model's {pipeline.max_text_len} text "
                          f"tokens (longest {int(lengths.max())}) and are truncated", stacklevel=2)
        pad_to = int(min(lengths.max(), pipeline.max_text_len))
        bs = min(int(batch_size), len(prompts))
        sigmas = pipeline.sigmas(steps, width, height)
        out = []
        for start in range(0, len(prompts), bs):
            p, s = prompts[start:start + bs], seeds[start:start + bs]
            real = len(p)
            p, s = p + [p[-1]] * (bs - real), s + [s[-1]] * (bs - real)
            ids, mask = prompt_lib.tokenize_prompts(pipeline.tokenizer, p, pipeline.max_text_len, pad_to=pad_to)
            hidden, hmask = pipeline.encode_ids(ids, mask)
            if guidance != 1.0:
                hidden, hmask, nh, nm = pipeline.negative_features(negative_prompt, hidden, hmask)
            else:
                nh, nm = jnp.zeros_like(hidden), jnp.zeros_like(hmask)
            noise = np.concatenate([pipeline.noise(seed, 1, 1, width, height) for seed in s])
            latents = pipeline.denoise(noise, sigmas, hidden, hmask, nh, nm, guidance)
            images = pipeline.decode(jax.block_until_ready(latents))
            out.append(np.asarray(images)[:real])
        return np.concatenate(out).astype(np.uint8)

    return fn


# --------------------------------------------------------------------------------------------------
# Outputs


def write_json(path: str | pathlib.Path, obj: Any) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def save_grid(path: str | pathlib.Path, images: np.ndarray, results: Sequence[Mapping[str, Any]],
              items: Sequence[EvalItem], *, per_task: int = 4, tile: int = 96) -> pathlib.Path:
    """A PNG: one row per task, ``per_task`` items each as (generated | ground truth), the generated
    image framed green (pass) or red (fail), the prompt and the failure reason underneath."""
    from PIL import Image, ImageDraw, ImageFont

    picks: dict[str, list[int]] = {}
    for k, r in enumerate(results):
        if r.get("image_index", 0) == 0 and len(picks.setdefault(r["task"], [])) < per_task:
            picks[r["task"]].append(k)
    rows = [t for t in TASKS if t in picks] + sorted(t for t in picks if t not in TASKS)
    cols = max((len(v) for v in picks.values()), default=1)
    font = ImageFont.load_default()
    text_h, pad, label_w = 36, 6, 90
    cell_w = 2 * tile + pad
    W = label_w + cols * (cell_w + 2 * pad)
    H = max(1, len(rows)) * (tile + text_h + 2 * pad) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for ri, task in enumerate(rows):
        y = pad + ri * (tile + text_h + 2 * pad)
        draw.text((4, y + tile // 2 - 6), task, fill=(0, 0, 0), font=font)
        for ci, k in enumerate(picks[task]):
            r = results[k]
            x = label_w + ci * (cell_w + 2 * pad)
            gen = Image.fromarray(np.asarray(images[k])).resize((tile, tile), Image.NEAREST)
            gt = Image.fromarray(shapes.render(items[r["item"]].scene, *np.asarray(images[k]).shape[1::-1])
                                 ).resize((tile, tile), Image.NEAREST)
            color = (30, 170, 50) if r["passed"] else (220, 30, 30)
            draw.rectangle([x - 3, y - 3, x + tile + 2, y + tile + 2], outline=color, width=3)
            canvas.paste(gen, (x, y))
            canvas.paste(gt, (x + tile + pad, y))
            lines = textwrap.wrap(r["prompt"], 34)[:2]
            if not r["passed"]:
                lines += textwrap.wrap(r["reason"], 34)[:1]
            for li, line in enumerate(lines):
                draw.text((x, y + tile + 3 + 11 * li), line, fill=(0, 0, 0) if li < 2 else color, font=font)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
