"""ShapesEval items: GenEval's six tasks as held-out procedural scenes with short and dense prompts.

Every item is a :class:`~lens_jax.data.shapes.Scene` built for its task (not drawn from the training
distribution), deterministic in ``(seed, task, k)`` from a scene rng stream of its own
(:data:`EVAL_STREAM`, the training scenes use stream 0 and the held-out eval scenes stream 1), plus:

* ``short_prompt``: GenEval-style alt-text ("a red circle left of a blue square", "three green
  stars"), only words of the captions' grammar (:data:`~lens_jax.data.shapes.VOCABULARY`). Colours are
  named in every prompt by default because every training caption names them (GenEval names a colour
  only in its colors/color_attr prompts: ``colors_in_prompts=False`` gives that literal form), but only
  what GenEval checks is scored (e.g. the class, not the colour, in single_object).
* ``dense_prompt``: :func:`~lens_jax.data.shapes.dense_caption` of the scene, the analog of Lens's
  prompt reasoner rewriting the short prompt into a full description.
* ``spec``: GenEval's metadata format, ``{"tag", "include": [{"class", "count", "color"?,
  "position"?: [relation, group index]}], "exclude": [{"class", "count"}]}``, checked by
  :mod:`lens_jax.eval.scoring`.

Tasks (GenEval's): single_object (one object, its shape is checked), two_objects (two different
shapes), counting (N = 2..4 copies of one shape; more than N fails), colors (one object, shape and
colour checked), position (two different shapes in grid cells related left of / right of / above /
below so that GenEval's box-centre rule with its 0.1 margin holds, with room to spare), color_attr (two
different shapes with two different colours, each colour bound to its shape).

Scene config. Items use a run's ``data.scene`` world (its shapes, colours, backgrounds, sizes, jitter)
and the grid's limits, but not its sampling *distribution*: a run trained with ``count_prob=0`` or
``max_groups=1`` still gets counting / two-object items (that is the point of GenEval: they measure
compositions the prompts ask for); :func:`task_notes` says which tasks are then out of the training
distribution. A task that cannot be built at all under a config (two_objects with one shape,
color_attr with one colour, counting with ``max_count < 2`` or ``max_objects < 2``) is skipped with a
warning, and :func:`lens_jax.eval.scoring.summarize` lists it under ``skipped`` with the reason.
Objects keep a gap of at least :data:`MIN_GAP` (normalised) between their extents, so that objects do
not touch at 32x32 (~1.6 px) and a detector can separate them.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Sequence

import numpy as np

from lens_jax.data import shapes
from lens_jax.data.shapes import Scene, ShapeObject, ShapesConfig

TASKS: tuple[str, ...] = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
EVAL_STREAM = 7          # scene rng stream of the eval items (train = 0, eval = 1)
MIN_GAP = 0.05           # normalised gap between object extents (~1.6 px at 32x32, 3.2 px at 64x64)
COUNTS = (2, 3, 4)       # GenEval counts 2..4
POSITION_THRESHOLD = 0.1  # GenEval's margin (fraction of the two box sizes)
# Items for the position task satisfy the rule with this stricter margin and direction share, so
# sub-pixel detection noise cannot flip a ground-truth render.
_SAFE_THRESHOLD, _SAFE_DIRECTION = 0.2, 0.6


@dataclasses.dataclass(frozen=True)
class EvalItem:
    task: str
    index: int               # k-th item of its task
    scene: Scene
    short_prompt: str
    dense_prompt: str
    spec: dict[str, Any]     # GenEval metadata: tag, include, exclude

    @property
    def uid(self) -> str:
        return f"{self.task}_{self.index:04d}"

    def prompt(self, style: str) -> str:
        if style == "short":
            return self.short_prompt
        if style == "dense":
            return self.dense_prompt
        raise ValueError(f"prompt style must be 'short' or 'dense', got {style!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "index": self.index, "uid": self.uid, "scene": self.scene.to_dict(),
                "short_prompt": self.short_prompt, "dense_prompt": self.dense_prompt, "spec": self.spec}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalItem":
        return cls(d["task"], int(d["index"]), Scene.from_dict(d["scene"]), d["short_prompt"],
                   d["dense_prompt"], d["spec"])


# --------------------------------------------------------------------------------------------------
# Geometry shared with the scorer


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD,
                      direction: float = 0.5) -> set[str]:
    """GenEval's ``relative_position``: relations of box A to box B (x0, y0, x1, y1) by box centres.

    The centre offset shrinks by ``threshold`` times the summed box sizes on each axis; a relation
    holds when its axis keeps more than ``direction`` of the (unshrunk) offset's length.
    """
    a, b = np.asarray(box_a, float).reshape(2, 2), np.asarray(box_b, float).reshape(2, 2)
    ca, cb = a.mean(0), b.mean(0)
    da, db = np.abs(a[1] - a[0]), np.abs(b[1] - b[0])
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - threshold * (da + db), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -direction:
        rels.add("left of")
    if dx > direction:
        rels.add("right of")
    if dy < -direction:
        rels.add("above")
    if dy > direction:
        rels.add("below")
    return rels


# --------------------------------------------------------------------------------------------------
# Feasibility under a scene config


def _colors_on(cfg: ShapesConfig, background: str) -> list[str]:
    return [c for c in cfg.colors if shapes._COLOR_OK[c, background]]


def _backgrounds_for(cfg: ShapesConfig, colors: Sequence[str]) -> list[str]:
    return [b for b in cfg.backgrounds if all(shapes._COLOR_OK[c, b] for c in colors)]


def _counts(cfg: ShapesConfig) -> tuple[int, ...]:
    return tuple(n for n in COUNTS if n <= min(cfg.max_count, cfg.max_objects))


def unavailable_tasks(scene_config: ShapesConfig | None = None) -> dict[str, str]:
    """Tasks that cannot be built under ``scene_config``, with the reason."""
    cfg = (scene_config or shapes.DEFAULT_CONFIG).validate()
    out = {}
    two = []
    if len(cfg.shapes) < 2:
        two.append(f"needs two shapes, the scene config has {list(cfg.shapes)}")
    if cfg.max_objects < 2:
        two.append(f"needs two objects, the scene config has max_objects={cfg.max_objects}")
    for t in ("two_objects", "position", "color_attr"):
        if two:
            out[t] = "; ".join(two)
    pair_ok = any(len(_colors_on(cfg, b)) >= 2 for b in cfg.backgrounds)
    if "color_attr" not in out and not pair_ok:
        out["color_attr"] = "needs two colours that both contrast with one background"
    if not _counts(cfg):
        out["counting"] = (f"needs 2+ copies, the scene config allows max_count={cfg.max_count}, "
                           f"max_objects={cfg.max_objects}")
    return out


def task_notes(scene_config: ShapesConfig | None = None) -> dict[str, str]:
    """Tasks whose items lie outside the scene config's training distribution (they are still built)."""
    cfg = (scene_config or shapes.DEFAULT_CONFIG).validate()
    notes = {}
    if cfg.count_prob <= 0 or cfg.max_count < max(COUNTS):
        allowed = "none" if cfg.count_prob <= 0 or cfg.max_count < 2 else f"up to {cfg.max_count}"
        notes["counting"] = (f"out of distribution: training scenes had repeated objects {allowed} "
                             f"(count_prob={cfg.count_prob}, max_count={cfg.max_count}); items ask for "
                             f"{list(_counts(cfg))}")
    if cfg.max_groups < 2:
        for t in ("two_objects", "position", "color_attr"):
            notes[t] = f"out of distribution: training scenes had one kind of object (max_groups={cfg.max_groups})"
    return notes


# --------------------------------------------------------------------------------------------------
# Layout


def _reach(shape: str, size: str) -> float:
    return shapes.SIZES[size] * shapes._EXTENT[shape]


def _position(cell: tuple[int, int], reach: float, jitter: np.ndarray) -> tuple[float, float]:
    lo, hi = reach + 0.02, 1 - reach - 0.02
    x = (cell[0] + 0.5) / 3 + float(jitter[0])
    y = (cell[1] + 0.5) / 3 + float(jitter[1])
    return min(max(x, lo), hi), min(max(y, lo), hi)


def _gaps_ok(pos: Sequence[tuple[float, float]], reach: Sequence[float]) -> bool:
    for i in range(len(pos)):
        for j in range(i):
            if math.dist(pos[i], pos[j]) < reach[i] + reach[j] + MIN_GAP:
                return False
    return True


_SPREAD_CELLS = ((0, 0), (2, 0), (0, 2), (2, 2), (1, 1))  # no two side by side


def _layout(rng: np.random.Generator, objs: Sequence[tuple[str, str]], cfg: ShapesConfig,
            cells_fn=None, accept=None, tries: int = 400) -> list[tuple[float, float]]:
    """Centres for objects ``[(shape, size)]``: distinct grid cells, jittered, clamped inside the
    canvas, at least MIN_GAP apart; ``cells_fn(rng)`` picks the cells, ``accept(positions)`` filters."""
    reach = [_reach(s, z) for s, z in objs]
    n = len(objs)
    if cells_fn is None:
        cells_fn = lambda r: [(int(c) % 3, int(c) // 3) for c in r.permutation(9)[:n]]
    for t in range(tries):
        cells = cells_fn(rng)
        jit = rng.uniform(-cfg.jitter, cfg.jitter, size=(n, 2)) if cfg.jitter > 0 else np.zeros((n, 2))
        pos = [_position(c, reach[k], jit[k]) for k, c in enumerate(cells)]
        if _gaps_ok(pos, reach) and (accept is None or accept(pos)):
            return pos
    # Fallback (not reached with the built-in sizes): cells that are never side by side, no jitter.
    if n <= len(_SPREAD_CELLS) and accept is None:
        return [_position(c, reach[k], np.zeros(2)) for k, c in enumerate(_SPREAD_CELLS[:n])]
    raise RuntimeError(f"could not lay out {list(objs)} in {tries} tries")


# --------------------------------------------------------------------------------------------------
# Prompts


def _a(word: str) -> str:
    return shapes._a(word)


def _one(shape: str, color: str | None) -> str:
    return f"{_a(color)} {color} {shape}" if color else f"{_a(shape)} {shape}"


def _many(n: int, shape: str, color: str | None) -> str:
    words = [shapes._num(n)] + ([color] if color else []) + [shapes._PLURAL[shape]]
    return " ".join(words)


# --------------------------------------------------------------------------------------------------
# Builders: (rng, k, cfg, colors_in_prompts) -> (scene, short prompt, spec)


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _scene(rng: np.random.Generator, background: str, objs: Sequence[tuple[str, str, str, int]],
           positions: Sequence[tuple[float, float]]) -> Scene:
    objects = tuple(ShapeObject(s, c, z, round(x, 4), round(y, 4), g)
                    for (s, c, z, g), (x, y) in zip(objs, positions))
    return Scene(background=background, objects=objects, text=None, variant=int(rng.integers(2**31)))


def _background_and_color(rng, cfg: ShapesConfig, color: str | None = None) -> tuple[str, str]:
    if color is None:
        background = _pick(rng, cfg.backgrounds)
        colors = _colors_on(cfg, background) or list(cfg.colors)
        return background, _pick(rng, colors)
    backgrounds = _backgrounds_for(cfg, [color]) or list(cfg.backgrounds)
    return _pick(rng, backgrounds), color


def _single(rng, k, cfg, named: bool, task: str):
    if task == "single_object":
        shape = cfg.shapes[k % len(cfg.shapes)]
        background, color = _background_and_color(rng, cfg)
    else:  # colors: balanced over the colours that some background of the config shows
        usable = [c for c in cfg.colors if _backgrounds_for(cfg, [c])] or list(cfg.colors)
        color = usable[k % len(usable)]
        background, color = _background_and_color(rng, cfg, color)
        shape = _pick(rng, cfg.shapes)
    size = _pick(rng, cfg.sizes)
    pos = _layout(rng, [(shape, size)], cfg)
    scene = _scene(rng, background, [(shape, color, size, 0)], pos)
    if task == "single_object":
        prompt = _one(shape, color if named else None)
        spec = {"include": [{"class": shape, "count": 1}], "exclude": []}
    else:
        prompt = _one(shape, color)
        spec = {"include": [{"class": shape, "count": 1, "color": color}], "exclude": []}
    return scene, prompt, spec


def _two_shapes(rng, k: int | None, cfg) -> tuple[str, str]:
    """Ordered pair of different shapes: the k-th (balanced over items) or, for k None, a random one."""
    pairs = [(a, b) for a in cfg.shapes for b in cfg.shapes if a != b]
    return pairs[k % len(pairs)] if k is not None else _pick(rng, pairs)


def _two_colors(rng, cfg, distinct: bool) -> tuple[str, str, str]:
    backgrounds = [b for b in cfg.backgrounds if len(_colors_on(cfg, b)) >= (2 if distinct else 1)]
    background = _pick(rng, backgrounds or list(cfg.backgrounds))
    colors = _colors_on(cfg, background) or list(cfg.colors)
    if distinct:
        i, j = rng.choice(len(colors), size=2, replace=False)
        return background, colors[int(i)], colors[int(j)]
    return background, _pick(rng, colors), _pick(rng, colors)


def _pair(rng, k, cfg, named: bool, task: str):
    a, b = _two_shapes(rng, None if task == "position" else k, cfg)
    background, ca, cb = _two_colors(rng, cfg, distinct=task == "color_attr")
    za, zb = _pick(rng, cfg.sizes), _pick(rng, cfg.sizes)
    objs = [(a, za), (b, zb)]
    if task == "position":
        rel = RELATIONS[k % len(RELATIONS)]

        def cells_fn(r):
            while True:
                ca_, cb_ = [(int(c) % 3, int(c) // 3) for c in r.permutation(9)[:2]]
                dx, dy = ca_[0] - cb_[0], ca_[1] - cb_[1]
                if {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[rel]:
                    return [ca_, cb_]

        def accept(pos):
            boxes = [_unit_box(s, z, p) for (s, z), p in zip(objs, pos)]
            return rel in relative_position(boxes[0], boxes[1], _SAFE_THRESHOLD, _SAFE_DIRECTION)

        pos = _layout(rng, objs, cfg, cells_fn, accept)
        prompt = f"{_one(a, ca if named else None)} {rel} {_one(b, cb if named else None)}"
        spec = {"include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                "exclude": []}
    else:
        pos = _layout(rng, objs, cfg)
        if task == "color_attr":
            prompt = f"{_one(a, ca)} and {_one(b, cb)}"
            spec = {"include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                    "exclude": []}
        else:
            prompt = f"{_one(a, ca if named else None)} and {_one(b, cb if named else None)}"
            spec = {"include": [{"class": a, "count": 1}, {"class": b, "count": 1}], "exclude": []}
    scene = _scene(rng, background, [(a, ca, za, 0), (b, cb, zb, 1)], pos)
    return scene, prompt, spec


def _unit_box(shape: str, size: str, pos: tuple[float, float]) -> tuple[float, float, float, float]:
    return shapes.bbox(ShapeObject(shape, "red", size, pos[0], pos[1], 0), 1, 1)


def _counting(rng, k, cfg, named: bool, task: str):
    counts = _counts(cfg)
    n = counts[k % len(counts)]
    shape = cfg.shapes[(k // len(counts)) % len(cfg.shapes)]
    background, color = _background_and_color(rng, cfg)
    size = _pick(rng, cfg.sizes)
    pos = _layout(rng, [(shape, size)] * n, cfg)
    scene = _scene(rng, background, [(shape, color, size, 0)] * n, pos)
    prompt = _many(n, shape, color if named else None)
    spec = {"include": [{"class": shape, "count": n}], "exclude": [{"class": shape, "count": n + 1}]}
    return scene, prompt, spec


_BUILDERS = {"single_object": _single, "colors": _single, "two_objects": _pair, "position": _pair,
             "color_attr": _pair, "counting": _counting}


def _item_rng(seed: int, task: str, k: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, EVAL_STREAM, TASKS.index(task), int(k)])


def make_item(task: str, k: int, seed: int = 0, scene_config: ShapesConfig | None = None, *,
              colors_in_prompts: bool = True) -> EvalItem:
    """The ``k``-th item of ``task``; deterministic in ``(seed, task, k, scene_config)``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")
    cfg = (scene_config or shapes.DEFAULT_CONFIG).validate()
    why = unavailable_tasks(cfg).get(task)
    if why:
        raise ValueError(f"task {task} is impossible under this scene config: {why}")
    scene, prompt, spec = _BUILDERS[task](_item_rng(seed, task, k), k, cfg, colors_in_prompts, task)
    spec = {"tag": task, **spec}
    return EvalItem(task, k, scene, prompt, shapes.dense_caption(scene), spec)


def make_eval_items(per_task: int, seed: int = 0, scene_config: ShapesConfig | None = None, *,
                    tasks: Sequence[str] = TASKS, colors_in_prompts: bool = True) -> list[EvalItem]:
    """``per_task`` items of each task (task-major order). Tasks impossible under ``scene_config`` are
    skipped with a warning (see :func:`unavailable_tasks`)."""
    if per_task < 0:
        raise ValueError(f"per_task must be >= 0, got {per_task}")
    cfg = (scene_config or shapes.DEFAULT_CONFIG).validate()
    skip = unavailable_tasks(cfg)
    items = []
    for task in tasks:
        if task in skip:
            warnings.warn(f"ShapesEval: skipping task {task}: {skip[task]}", stacklevel=2)
            continue
        items += [make_item(task, k, seed, cfg, colors_in_prompts=colors_in_prompts) for k in range(per_task)]
    return items


def scene_config_from_dict(overrides: dict[str, Any] | None) -> ShapesConfig | None:
    """A run's ``data.scene`` overrides (lists allowed) as a ShapesConfig; None for no overrides."""
    if not overrides:
        return None
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(overrides).items()}
    return ShapesConfig(**raw).validate()
