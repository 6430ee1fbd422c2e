"""Procedural "shapes" scenes: the embedded default dataset.

A scene is a few flat coloured shapes (and optionally one short rendered word) on a plain background,
sampled deterministically from ``(seed, index)``. Everything is in normalised coordinates so the same
scene renders at any size or aspect ratio, and every caption comes from a small fixed grammar whose
words are enumerable (:data:`VOCABULARY`), which the word-level tokenizer is built from.

Layout. The unit square is cut into a 3x3 grid; every object (and the text) takes its own cell, its
centre jittered a little inside the cell. Object sizes are radii relative to ``min(width, height)``, so a
scene that does not overlap in the unit square does not overlap at any aspect ratio, and objects stay
fully inside the canvas at any aspect ratio. Absolute layout words ("in the top left corner") name the
cell; relations ("to the left of") compare cells, so they hold with GenEval's 0.1 box-centre margin.

Cropping. A centre crop that changes the aspect ratio can cut objects near the edges (a 2:1 crop of a
square render keeps only the middle half of one axis). The data pipeline therefore assigns each record
to the bucket with the nearest aspect ratio, and the render sizes should use the buckets' aspect
ratios (e.g. render ``128x64`` for a ``128x64`` bucket): then the crop is a pure resize.

Captions. :func:`dense_caption` gives 60-120 words and at most 128 word-level tokens (with the
default scene config): every group's colour, shape, size, count and absolute position, pairwise
relations of single objects, the background, the rendered word, and the total count. :func:`short_caption` gives alt-text under 10 words. Both vary
templates and orderings with an rng derived from the scene, so they are pure functions of the scene.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import struct
import zlib
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# --------------------------------------------------------------------------------------------------
# The world

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")

# GenEval's ten colours, chosen to stay distinct after downsampling to 64x64.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (250, 220, 30),
    "purple": (130, 40, 170),
    "orange": (255, 140, 0),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "pink": (255, 130, 200),
    "brown": (130, 75, 30),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "light gray": (195, 195, 195),
    "dark gray": (70, 70, 70),
    "teal": (0, 110, 110),
}

# Object radius as a fraction of min(width, height): diameters of ~10, 13 and 18 px at 64x64.
SIZES: dict[str, float] = {"small": 0.075, "medium": 0.105, "large": 0.14}

# Farthest point of each drawn shape from its centre, in units of the radius (for overlap checks).
_EXTENT = {"circle": 1.0, "square": 1.16, "triangle": 1.1, "star": 1.12, "hexagon": 1.05}

TEXT_WORDS: tuple[str, ...] = (
    "sun", "cat", "dog", "hi", "ok", "yes", "no", "go", "up", "art", "box", "fun", "jax", "lens",
    "zen", "joy",
)
TEXT_COLORS: dict[str, tuple[int, int, int]] = {"white": (250, 250, 250), "black": (15, 15, 15)}

REGIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (1, 0): "top", (2, 0): "top right",
    (0, 1): "left", (1, 1): "center", (2, 1): "right",
    (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right",
}

_MIN_COLOR_CONTRAST = 100.0  # Euclidean RGB distance between an object colour and the background

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """How scenes are sampled. The defaults keep scenes simple (1-3 kinds of object, <= 6 objects)."""

    min_groups: int = 1          # kinds of object (distinct colour+shape) per scene
    max_groups: int = 3
    count_prob: float = 0.25     # chance that a kind appears more than once
    max_count: int = 4           # most identical copies of one kind
    max_objects: int = 5         # most objects in a scene (<= 9, the grid cells; 8 with text)
    text_prob: float = 0.25      # chance that the scene has a rendered word
    jitter: float = 0.04         # centre jitter inside a grid cell (normalised units)
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    sizes: tuple[str, ...] = tuple(SIZES)

    def validate(self) -> "ShapesConfig":
        if not 1 <= self.min_groups <= self.max_groups:
            raise ValueError(f"ShapesConfig.min_groups/max_groups: need 1 <= min <= max, got "
                             f"{self.min_groups}, {self.max_groups}")
        if not 1 <= self.max_count <= 9:
            raise ValueError(f"ShapesConfig.max_count: need 1..9, got {self.max_count}")
        if not 1 <= self.max_objects <= 9:
            raise ValueError(f"ShapesConfig.max_objects: need 1..9, got {self.max_objects}")
        for field, allowed in (("shapes", SHAPES), ("colors", COLORS), ("backgrounds", BACKGROUNDS),
                               ("sizes", SIZES)):
            values = getattr(self, field)
            bad = [v for v in values if v not in allowed]
            if not values or bad:
                raise ValueError(f"ShapesConfig.{field}: unknown or empty {bad or values!r}; "
                                 f"allowed {tuple(allowed)}")
        return self


DEFAULT_CONFIG = ShapesConfig()


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    x: float  # normalised centre, 0 = left
    y: float  # normalised centre, 0 = top
    group: int

    @property
    def radius(self) -> float:
        """Radius as a fraction of min(width, height)."""
        return SIZES[self.size]

    @property
    def cell(self) -> tuple[int, int]:
        return _cell(self.x, self.y)

    @property
    def region(self) -> str:
        return REGIONS[self.cell]


@dataclasses.dataclass(frozen=True)
class SceneText:
    word: str   # lower case; rendered in capitals
    color: str  # key of TEXT_COLORS
    x: float
    y: float

    @property
    def region(self) -> str:
        return REGIONS[_cell(self.x, self.y)]


@dataclasses.dataclass(frozen=True)
class Group:
    shape: str
    color: str
    size: str
    count: int
    objects: tuple[ShapeObject, ...]


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]
    text: SceneText | None = None
    variant: int = 0  # seeds the caption rngs: captions are pure functions of the scene

    @property
    def groups(self) -> tuple[Group, ...]:
        by_id: dict[int, list[ShapeObject]] = {}
        for o in self.objects:
            by_id.setdefault(o.group, []).append(o)
        return tuple(Group(v[0].shape, v[0].color, v[0].size, len(v), tuple(v))
                     for _, v in sorted(by_id.items()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        text = d.get("text")
        objects = tuple(
            ShapeObject(o["shape"], o["color"], o["size"], float(o["x"]), float(o["y"]), int(o["group"]))
            for o in d["objects"])
        return cls(
            background=d["background"],
            objects=objects,
            text=None if not text else SceneText(text["word"], text["color"], float(text["x"]),
                                                 float(text["y"])),
            variant=int(d.get("variant", 0)),
        )


def _cell(x: float, y: float) -> tuple[int, int]:
    return min(int(x * 3), 2), min(int(y * 3), 2)


# --------------------------------------------------------------------------------------------------
# Sampling


def _contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return math.dist(a, b)


_COLOR_OK = {(c, b): _contrast(COLORS[c], BACKGROUNDS[b]) >= _MIN_COLOR_CONTRAST
             for c in COLORS for b in BACKGROUNDS}
_TEXT_COLOR_FOR = {b: max(TEXT_COLORS, key=lambda n: _contrast(TEXT_COLORS[n], BACKGROUNDS[b]))
                   for b in BACKGROUNDS}


def scene_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The rng of scene ``index`` in ``stream`` (0 = train, 1 = eval) for ``seed``."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(stream), int(index)])


def sample_scene(rng_or_seed: np.random.Generator | int, index: int = 0, *, stream: int = 0,
                 config: ShapesConfig | None = None) -> Scene:
    """Samples one scene; deterministic in ``(seed, index, stream)`` or in the given rng's state."""
    cfg = (config or DEFAULT_CONFIG).validate()
    if isinstance(rng_or_seed, np.random.Generator):
        rng = rng_or_seed
    else:
        rng = scene_rng(int(rng_or_seed), index, stream)

    background = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
    colors = [c for c in cfg.colors if _COLOR_OK[c, background]] or list(cfg.colors)
    has_text = rng.random() < cfg.text_prob
    cells_free = 9 - int(has_text)
    max_objects = min(cfg.max_objects, cells_free)

    kinds = [(s, c) for s in cfg.shapes for c in colors]
    n_groups = int(rng.integers(cfg.min_groups, cfg.max_groups + 1))
    n_groups = max(1, min(n_groups, max_objects, len(kinds)))
    chosen = rng.choice(len(kinds), size=n_groups, replace=False)
    counts = [int(rng.integers(2, cfg.max_count + 1)) if (cfg.max_count > 1 and rng.random() < cfg.count_prob)
              else 1 for _ in range(n_groups)]
    while sum(counts) > max_objects:  # trim the largest count until the scene fits
        counts[int(np.argmax(counts))] -= 1
    sizes = [cfg.sizes[int(rng.integers(len(cfg.sizes)))] for _ in range(n_groups)]

    cells = [(int(c) % 3, int(c) // 3) for c in rng.permutation(9)]
    specs = []  # (shape, colour, size, group, cell)
    k = 0
    for g in range(n_groups):
        shape, color = kinds[int(chosen[g])]
        for _ in range(counts[g]):
            specs.append((shape, color, sizes[g], g, cells[k]))
            k += 1
    text_cell = cells[k] if has_text else None

    reach = [SIZES[size] * _EXTENT[shape] for shape, _, size, _, _ in specs]

    def place(jitter: float) -> list[tuple[float, float]] | None:
        offsets = rng.uniform(-jitter, jitter, size=(len(specs), 2)).tolist() if jitter else None
        pos = []
        for k, (_, _, _, _, (cx, cy)) in enumerate(specs):
            lo, hi = reach[k] + 0.02, 1 - reach[k] - 0.02
            x = (cx + 0.5) / 3 + (offsets[k][0] if offsets else 0.0)
            y = (cy + 0.5) / 3 + (offsets[k][1] if offsets else 0.0)
            pos.append((min(max(x, lo), hi), min(max(y, lo), hi)))
        for i in range(len(specs)):
            for j in range(i):
                if math.dist(pos[i], pos[j]) < reach[i] + reach[j] + 0.01:
                    return None
        return pos

    positions = None
    for _ in range(8):
        positions = place(cfg.jitter)
        if positions is not None:
            break
    if positions is None:
        positions = place(0.0) or [((cx + 0.5) / 3, (cy + 0.5) / 3) for *_, (cx, cy) in specs]

    objects = tuple(ShapeObject(s, c, z, round(x, 4), round(y, 4), g)
                    for (s, c, z, g, _), (x, y) in zip(specs, positions))
    text = None
    if has_text:
        word = TEXT_WORDS[int(rng.integers(len(TEXT_WORDS)))]
        tcolor = _TEXT_COLOR_FOR[background]
        tx, ty = text_cell
        text = SceneText(word, tcolor, round((tx + 0.5) / 3, 4), round((ty + 0.5) / 3, 4))
    return Scene(background=background, objects=objects, text=text, variant=int(rng.integers(2**31)))


# --------------------------------------------------------------------------------------------------
# Rendering


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, start_deg: float) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(math.radians(start_deg + 360 * k / n)),
                 cy + radius * math.sin(math.radians(start_deg + 360 * k / n))) for k in range(n)]

    if shape == "square":
        h = 0.82 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return ring(3, 1.1 * r, -90)
    if shape == "hexagon":
        return ring(6, 1.05 * r, -90)
    if shape == "star":
        outer, inner = ring(5, 1.12 * r, -90), ring(5, 0.48 * r, -54)
        return [p for pair in zip(outer, inner) for p in pair]
    raise ValueError(f"unknown shape {shape!r}")


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _unit_bounds(shape: str) -> tuple[float, float, float, float]:
    if shape == "circle":
        return (-1.0, -1.0, 1.0, 1.0)
    pts = np.array(_shape_polygon(shape, 0.0, 0.0, 1.0))
    return (*pts.min(0).tolist(), *pts.max(0).tolist())


_UNIT_BOUNDS = {s: _unit_bounds(s) for s in SHAPES}


def bbox(obj: ShapeObject, width: int, height: int) -> tuple[float, float, float, float]:
    """The object's drawn box (x0, y0, x1, y1) in normalised image coordinates at width x height."""
    r = obj.radius * min(width, height)
    x0, y0, x1, y1 = _UNIT_BOUNDS[obj.shape]
    return (round(obj.x + r * x0 / width, 4), round(obj.y + r * y0 / height, 4),
            round(obj.x + r * x1 / width, 4), round(obj.y + r * y1 / height, 4))


def render(scene: Scene, width: int, height: int, *, supersample: int = 2) -> np.ndarray:
    """Draws the scene; returns uint8 [height, width, 3]. Deterministic."""
    ss = max(1, int(supersample))
    W, H = width * ss, height * ss
    img = Image.new("RGB", (W, H), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    m = min(W, H)
    for o in scene.objects:
        cx, cy, r = o.x * W, o.y * H, o.radius * m
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_shape_polygon(o.shape, cx, cy, r), fill=fill)
    if scene.text is not None:
        t = scene.text
        label = t.word.upper()
        size = max(6, int(0.13 * m))
        font = _font(size)
        box = draw.textbbox((0, 0), label, font=font)
        max_w = 0.3 * W
        if box[2] - box[0] > max_w:  # shrink to fit its cell
            size = max(6, int(size * max_w / (box[2] - box[0])))
            font = _font(size)
            box = draw.textbbox((0, 0), label, font=font)
        tw, th = box[2] - box[0], box[3] - box[1]
        draw.text((t.x * W - tw / 2 - box[0], t.y * H - th / 2 - box[1]), label,
                  fill=TEXT_COLORS[t.color], font=font)
    if ss > 1:
        img = img.resize((width, height), Image.BOX)
    return np.asarray(img, dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# Caption grammar. Every literal used below is listed here so that VOCABULARY is enumerable.

_PLURAL = {s: s + "s" for s in SHAPES}
_SIZE_ADJ = {"small": "small", "medium": "medium sized", "large": "large"}
_SHAPE_DETAIL = {
    "circle": "a smooth round outline",
    "square": "four equal sides and four right angles",
    "triangle": "three straight sides and one corner pointing up",
    "star": "five sharp points",
    "hexagon": "six equal sides and six corners",
}
_REGION_PHRASES = {
    "top left": ("in the top left corner", "at the top left", "in the upper left"),
    "top right": ("in the top right corner", "at the top right", "in the upper right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right"),
    "top": ("at the top", "at the top center", "in the upper middle"),
    "bottom": ("at the bottom", "at the bottom center", "in the lower middle"),
    "left": ("on the left", "on the left side", "at the middle of the left side"),
    "right": ("on the right", "on the right side", "at the middle of the right side"),
    "center": ("in the center", "in the middle", "at the center of the image"),
}
_INTROS = (
    "a simple flat illustration of {things} on a plain {bg} background.",
    "this synthetic image shows {things} against a solid {bg} background.",
    "a clean digital drawing with a flat {bg} background and {things}.",
    "a minimal picture of {things} placed on an even {bg} background.",
)
_INVENTORY = (
    "in total there {be} {items}.",
    "the image contains exactly {items}.",
    "counting everything, there {be} {items}.",
)
_GROUP_ONE_LONG = (
    "the {color} {shape} is {size} and sits {where}.",
    "{where}, there is {a} {size} {color} {shape}.",
    "{a} {size} {color} {shape} is placed {where}.",
)
_DETAIL_ONE = (
    "it has {detail} and is filled with solid {color}.",
    "the {shape} has {detail}.",
)
_GROUP_MANY_LONG = (
    "{count} identical {size} {color} {shapes} appear: {members}.",
    "there are {count} {size} {color} {shapes}: {members}.",
)
_DETAIL_MANY = (
    "each of them has {detail} and is filled with solid {color}.",
    "{all} {shapes} have {detail}.",
)
_GROUP_ONE_SHORT = ("{a} {size} {color} {shape} {where}.",)
_GROUP_MANY_SHORT = ("{count} {size} {color} {shapes}: {members}.",)
_RELATION = (
    "the {a} {verb} {rel} the {b}.",
)
_REL_VERBS = ("is", "sits", "appears")
_REL_WORDS = ("to the left of", "to the right of", "above", "below", "and")
_TEXT_SENTENCES = (
    'the word "{word}" is written in {tcolor} capital letters {where}.',
    '{where}, the word "{word}" is written in {tcolor} letters.',
    'there is also some text: the word "{word}" in {tcolor} {where}.',
)
_NO_TEXT = (
    "there is no text in the image.",
    "no letters or words appear anywhere.",
)
_FILLERS_MANY = (
    "the shapes do not overlap and have crisp edges.",
    "each shape is a single solid color without an outline.",
)
_FILLERS_ONE = (
    "the shape has crisp edges and does not touch the border.",
    "the shape is a single solid color without an outline.",
)
_FILLERS = (
    "everything is drawn with flat colors and no shading.",
    "there are no shadows, gradients or textures anywhere.",
    "the rest of the {bg} background is empty.",
    "the style is minimal, like a simple vector graphic.",
    "the picture is seen straight on from the front.",
    "the lighting is even across the whole picture.",
    "nothing else is visible in the scene.",
)
_SHORT_BG = ("on {bg}", "on a {bg} background")
_SHORT_JOIN = ("and", "with", "next to", "left of", "right of", "above", "below", "in the", "the word",
               "colored shapes", "simple shapes on a background", "other shapes", ",")
_EXTRA_WORDS = ("a", "an", "one", "is", "are", "the", "of", "and", "both", "all", ",", ".", ":", '"')


def _tokens(text: str) -> list[str]:
    """Words and single punctuation marks, lower-cased (the word tokenizer's pre-tokenization)."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _build_vocabulary() -> list[str]:
    words: set[str] = set()
    literal_groups: list[Sequence[str]] = [
        SHAPES, tuple(_PLURAL.values()), tuple(COLORS), tuple(BACKGROUNDS), tuple(_SIZE_ADJ.values()),
        tuple(_SHAPE_DETAIL.values()), tuple(TEXT_WORDS), tuple(TEXT_COLORS), tuple(REGIONS.values()),
        _NUMBER_WORDS, _INTROS, _INVENTORY, _GROUP_ONE_LONG, _DETAIL_ONE, _GROUP_MANY_LONG, _DETAIL_MANY,
        _GROUP_ONE_SHORT, _GROUP_MANY_SHORT, _RELATION, _REL_VERBS, _REL_WORDS, _TEXT_SENTENCES,
        _NO_TEXT, _FILLERS_MANY, _FILLERS_ONE, _FILLERS, _SHORT_BG, _SHORT_JOIN, _EXTRA_WORDS,
        ("shape", "shapes", "colored", "and a short word"),
    ]
    literal_groups += list(_REGION_PHRASES.values())
    for group in literal_groups:
        for text in group:
            words.update(_tokens(re.sub(r"\{\w+\}", " ", text)))
    return sorted(words)


# --------------------------------------------------------------------------------------------------
# Captions


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _num(n: int) -> str:
    return _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _caption_rng(scene: Scene, kind: int) -> np.random.Generator:
    return np.random.default_rng([scene.variant, kind])


def _n_words(sentences: Sequence[str]) -> int:
    return sum(len(s.split()) for s in sentences)


def _relation(a: ShapeObject, b: ShapeObject) -> str | None:
    (ac, ar), (bc, br) = a.cell, b.cell
    parts = []
    if ar < br:
        parts.append("above")
    elif ar > br:
        parts.append("below")
    if ac < bc:
        parts.append("to the left of")
    elif ac > bc:
        parts.append("to the right of")
    if not parts:
        return None
    return " and ".join(parts) if len(parts) == 2 else parts[0]


def _n_tokens(sentences: Sequence[str]) -> int:
    return sum(len(_tokens(s)) for s in sentences)


def dense_caption(scene: Scene, rng: np.random.Generator | None = None, *, min_words: int = 60,
                  max_words: int = 120, max_tokens: int = 128) -> str:
    """A detailed caption of every object, the layout, relations, text and background.

    Between ``min_words`` and ``max_words`` whitespace-separated words, and at most ``max_tokens``
    word-tokenizer tokens (words + punctuation), for the default scene config (scenes with many
    objects may run longer: nothing is dropped that the counts need).
    """
    rng = rng if rng is not None else _caption_rng(scene, 1)
    groups = list(scene.groups)
    order = list(rng.permutation(len(groups)))
    groups = [groups[i] for i in order]
    bg = scene.background
    n_obj = len(scene.objects)

    things = ("one colored shape" if n_obj == 1 else f"{_num(n_obj)} colored shapes")
    if scene.text is not None:
        things += " and a short word"
    intro = _pick(rng, _INTROS).format(things=things, bg=bg)

    items = [f"{_num(g.count)} {g.color} {_PLURAL[g.shape] if g.count > 1 else g.shape}" for g in groups]
    be = "is" if groups[0].count == 1 else "are"
    inventory = _pick(rng, _INVENTORY).format(be=be, items=_join(items))

    def where(region: str) -> str:
        return _pick(rng, _REGION_PHRASES[region])

    def group_sentences(g: Group, long: bool) -> list[str]:
        size = _SIZE_ADJ[g.size]
        if g.count == 1:
            o = g.objects[0]
            tmpl = _pick(rng, _GROUP_ONE_LONG if long else _GROUP_ONE_SHORT)
            s = tmpl.format(color=g.color, shape=g.shape, size=size, where=where(o.region), a=_a(size))
            out = [s]
            if long:
                out.append(_pick(rng, _DETAIL_ONE).format(detail=_SHAPE_DETAIL[g.shape], color=g.color,
                                                           shape=g.shape))
            return out
        members = _join([f"one {where(o.region)}" for o in g.objects])
        tmpl = _pick(rng, _GROUP_MANY_LONG if long else _GROUP_MANY_SHORT)
        out = [tmpl.format(count=_num(g.count), size=size, color=g.color, shapes=_PLURAL[g.shape],
                           members=members)]
        if long:
            out.append(_pick(rng, _DETAIL_MANY).format(detail=_SHAPE_DETAIL[g.shape], color=g.color,
                                                        all="both" if g.count == 2 else f"all {_num(g.count)}",
                                                        shapes=_PLURAL[g.shape]))
        return out

    long_groups = [group_sentences(g, True) for g in groups]
    short_groups = [group_sentences(g, False) for g in groups]

    singles = [g for g in groups if g.count == 1]
    relations = []
    for i in range(len(singles)):
        for j in range(i + 1, len(singles)):
            a, b = singles[i], singles[j]
            if rng.random() < 0.5:
                a, b = b, a
            rel = _relation(a.objects[0], b.objects[0])
            if rel is None:
                continue
            relations.append(_pick(rng, _RELATION).format(
                a=f"{a.color} {a.shape}", b=f"{b.color} {b.shape}", verb=_pick(rng, _REL_VERBS), rel=rel))

    if scene.text is not None:
        text = [_pick(rng, _TEXT_SENTENCES).format(word=scene.text.word.upper(), tcolor=scene.text.color,
                                                   where=where(scene.text.region))]
    else:
        text = [_pick(rng, _NO_TEXT)]

    use_long = [True] * len(groups)
    keep_inventory = True
    n_rel = len(relations)

    def assemble() -> list[str]:
        body = [s for k, g in enumerate(groups) for s in (long_groups[k] if use_long[k] else short_groups[k])]
        blocks = [[inventory] if keep_inventory else [], body, relations[:n_rel], text]
        return [intro] + [s for b in layout for s in blocks[b]]

    layout = _pick(rng, ((0, 1, 2, 3), (1, 2, 0, 3), (3, 1, 2, 0), (1, 2, 3, 0)))
    sentences = assemble()

    def too_long(sents: Sequence[str]) -> bool:
        return _n_words(sents) > max_words or _n_tokens(sents) > max_tokens

    # Too long: shorten group descriptions (largest first), then drop relations, then the inventory.
    for k in sorted(range(len(groups)), key=lambda k: -_n_words(long_groups[k])):
        if not too_long(sentences):
            break
        use_long[k] = False
        sentences = assemble()
    while too_long(sentences) and n_rel > 0:
        n_rel -= 1
        sentences = assemble()
    if too_long(sentences):  # group sentences state the counts too
        keep_inventory = False
        sentences = assemble()
    # Too short: add generic sentences about the style.
    pool = list(_FILLERS_ONE if n_obj == 1 else _FILLERS_MANY) + list(_FILLERS)
    pool = [pool[i].format(bg=bg) for i in rng.permutation(len(pool))]
    for filler in pool:
        if _n_words(sentences) >= min_words:
            break
        if not too_long(sentences + [filler]):
            sentences.append(filler)
    return " ".join(sentences)


def short_caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Alt-text style, fewer than 10 words; may leave things out, as real alt-text does."""
    rng = rng if rng is not None else _caption_rng(scene, 2)
    groups = list(scene.groups)
    groups = [groups[i] for i in rng.permutation(len(groups))]
    bg = scene.background

    def full(g: Group) -> str:  # "a red circle" / "three red circles"
        return (f"{_a(g.color)} {g.color} {g.shape}" if g.count == 1
                else f"{_num(g.count)} {g.color} {_PLURAL[g.shape]}")

    def compact(g: Group) -> str:  # "red circle" / "three red circles"
        return f"{g.color} {g.shape}" if g.count == 1 else f"{_num(g.count)} {g.color} {_PLURAL[g.shape]}"

    def sized(g: Group) -> str:
        size = g.size if g.size != "medium" else "medium sized"
        return (f"{_a(size)} {size} {g.color} {g.shape}" if g.count == 1
                else f"{_num(g.count)} {size} {g.color} {_PLURAL[g.shape]}")

    cands: list[str] = []
    if len(groups) == 1:
        g = groups[0]
        cands += [full(g), sized(g)]
        cands += [full(g) + " " + t.format(bg=bg) for t in _SHORT_BG]
        if g.count == 1:
            cands.append(f"{full(g)} {_REGION_PHRASES[g.objects[0].region][0]}")
    else:
        g1, g2 = groups[0], groups[1]
        if len(groups) == 2:
            cands += [f"{full(g1)} and {full(g2)}", f"{full(g1)} with {full(g2)}",
                      f"{full(g1)} and {full(g2)} on {bg}"]
            if g1.count == 1 and g2.count == 1:
                rel = _relation(g1.objects[0], g2.objects[0])
                if rel in ("to the left of", "to the right of", "above", "below"):
                    cands.append(f"{full(g1)} {rel.replace('to the ', '')} {full(g2)}")
                cands.append(f"{full(g1)} next to {full(g2)}")
        else:
            cands += [_join([compact(g) for g in groups]), f"{full(g1)} and other shapes",
                      f"{_num(len(scene.objects))} colored shapes on {bg}"]
    if scene.text is not None:
        cands += [f'{full(groups[0])} and the word "{scene.text.word.upper()}"']
    cands = [c for c in cands if len(c.split()) < 10] or [f"simple shapes on a {bg} background"]
    return _pick(rng, cands)


def ground_truth(scene: Scene, width: int | None = None, height: int | None = None) -> dict[str, Any]:
    """JSON-able facts for evaluation: objects, groups (counts), regions, relations, text, background.

    With ``width``/``height`` each object also gets its drawn ``bbox`` (normalised x0, y0, x1, y1).
    ``relations`` lists every ordered object pair with "left of" / "above" (their inverses are implied);
    they compare grid cells, so a relation holds with GenEval's 0.1 box-centre margin.
    """
    objects = []
    for i, o in enumerate(scene.objects):
        d = {"id": i, "shape": o.shape, "color": o.color, "size": o.size, "x": o.x, "y": o.y,
             "radius": o.radius, "group": o.group, "region": o.region, "cell": list(o.cell)}
        if width and height:
            d["bbox"] = list(bbox(o, width, height))
        objects.append(d)
    groups = [{"id": k, "shape": g.shape, "color": g.color, "size": g.size, "count": g.count,
               "objects": [scene.objects.index(o) for o in g.objects]}
              for k, g in enumerate(scene.groups)]
    relations = []  # only "left of" and "above": "right of" / "below" are these with roles swapped
    for i, a in enumerate(scene.objects):
        for j, b in enumerate(scene.objects):
            (ac, ar), (bc, br) = a.cell, b.cell
            if ac < bc:
                relations.append({"subject": i, "relation": "left of", "object": j})
            if ar < br:
                relations.append({"subject": i, "relation": "above", "object": j})
    text = None
    if scene.text is not None:
        t = scene.text
        text = {"word": t.word, "color": t.color, "x": t.x, "y": t.y, "region": t.region}
    out = {
        "background": scene.background,
        "num_objects": len(scene.objects),
        "objects": objects,
        "groups": groups,
        "relations": relations,
        "text": text,
        "variant": scene.variant,
    }
    if width and height:
        out["width"], out["height"] = int(width), int(height)
    return out


def scene_from_ground_truth(gt: dict[str, Any]) -> Scene:
    """Rebuilds the scene (and therefore its renders and captions) from :func:`ground_truth`."""
    objs = [{"shape": o["shape"], "color": o["color"], "size": o["size"], "x": o["x"], "y": o["y"],
             "group": o["group"]} for o in gt["objects"]]
    return Scene.from_dict({"background": gt["background"], "objects": objs, "text": gt.get("text"),
                            "variant": gt.get("variant", 0)})


def encode_png(image: np.ndarray, level: int = 6) -> bytes:
    """Minimal, fast PNG encoder for uint8 [H, W, 3] (no filters; zlib ``level``)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    h, w, c = image.shape
    if c != 3:
        raise ValueError(f"encode_png: expected [H, W, 3], got {image.shape}")
    raw = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, level)) + chunk(b"IEND", b""))


def make_record(seed: int, index: int, stream: int, width: int, height: int,
                config: ShapesConfig | None = None) -> dict[str, Any]:
    """One dataset record: PNG bytes, size, both captions and ground truth (JSON) of one scene."""
    scene = sample_scene(seed, index, stream=stream, config=config)
    return {
        "image": encode_png(render(scene, width, height)),
        "width": int(width),
        "height": int(height),
        "dense_caption": dense_caption(scene),
        "short_caption": short_caption(scene),
        "ground_truth": json.dumps(ground_truth(scene, width, height), sort_keys=True),
        "index": int(index),
    }


def make_records(seed: int, stream: int, start: int, stop: int, sizes: Sequence[tuple[int, int]],
                 config: ShapesConfig | None = None) -> list[dict[str, Any]]:
    """Records ``start..stop-1``; record ``i`` is rendered at ``sizes[i % len(sizes)]`` (W, H)."""
    return [make_record(seed, i, stream, *sizes[i % len(sizes)], config=config) for i in range(start, stop)]


VOCABULARY: list[str] = _build_vocabulary()
