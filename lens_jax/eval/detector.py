"""A programmatic detector for the shapes world: pixels in, (colour, shape, box) detections out.

No learned weights. The renderer's world is known (a flat background, flat objects in GenEval's ten
colours, five shapes), so detection is analysis by synthesis:

1. Background: the median colour of the image border (objects never touch the border).
2. Colour: each pixel is explained as a blend ``background + alpha * (colour - background)`` of the
   background with every palette colour that contrasts with it (:data:`MIN_CONTRAST`); its label is
   the colour with the smallest residual. This labels anti-aliased edge pixels by their true colour (a
   half-covered red pixel on gray is not "brown", which it is nearest to in RGB). Pixels with
   ``alpha >= 0.5`` are object cores.
3. Objects: 8-connected components of each colour's core. Every other pixel within :data:`RIM`
   pixels of a core belongs to its nearest core (a Voronoi split, so neighbours do not share edge
   pixels); an object's coverage is the sum of its colour's ``alpha`` over its pixels, rescaled by
   the core's own saturation (90th percentile of alpha) so that a faded generated colour still
   measures the right area. Objects whose coverage is below ``min_area`` (a fraction of
   ``min(w, h)**2``) are noise and dropped.
4. Shape: for each shape, the template that has the measured coverage (radius from area) and centre
   (the coverage centroid: every shape is a regular polygon or star, centroid = centre) is rasterised
   with 4x4 supersampling, blurred by each of :data:`BLURS` (generated images are soft), and compared
   with the measured coverage; the least-squares fit wins. ``score`` is ``1 - L1 / area`` of that
   shape's best template (1 = perfect; blurred or malformed blobs score lower), the analog of a
   detector's confidence, and ``shape_scores`` gives it for every shape.
5. Box: the extent of the pixels with ``alpha >= 0.5``; ``center`` is the box centre (GenEval's
   position rule uses box centres). All coordinates are normalised to [0, 1] (x0, y0, x1, y1).

Works from 32x32 (medium/large objects) upwards; tolerates blur (coverage is measured, not
thresholded) and speckle noise (tiny components are dropped).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage  # a dependency of jax

from lens_jax.data import shapes

MIN_AREA = 0.006       # smallest kept object coverage, fraction of min(w, h)**2 (a small triangle is 0.009)
# Palette colours closer than this to the background are not considered. The renderer only puts a
# colour on a background it differs from by >= 100 (shapes._MIN_COLOR_CONTRAST); the lower bound here
# leaves room for a generated background that is a little off, and drops brown on dark gray (72), which
# a blurred orange or red edge on dark gray resembles.
MIN_CONTRAST = 80.0
_TEMPLATE_RES = 512    # canonical template raster
_TEMPLATE_R = 200.0    # canonical radius in template pixels
_SS = 4                # supersampling of the template fit
MAX_SIDE = 256         # larger images are box-downsampled first (objects stay >= 10 px at 1024)
RIM = 3.0              # pixels around an object's core that count towards its coverage
BLURS = (0.0, 0.6, 1.0, 1.5)  # Gaussian blurs (pixels) tried on every template (generated images are soft)


@dataclasses.dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    box: tuple[float, float, float, float]  # normalised x0, y0, x1, y1
    center: tuple[float, float]             # box centre, normalised
    area: float                             # coverage, fraction of the image
    score: float                            # 1 - L1 template misfit / area (best shape)
    shape_scores: dict[str, float]          # the same for every shape
    color_residual: float                   # median RGB distance of the core to the colour's blend line

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["box"] = [round(v, 4) for v in self.box]
        d["center"] = [round(v, 4) for v in self.center]
        d["area"] = round(self.area, 5)
        d["score"] = round(self.score, 4)
        d["shape_scores"] = {k: round(v, 4) for k, v in self.shape_scores.items()}
        d["color_residual"] = round(self.color_residual, 2)
        return d


# --------------------------------------------------------------------------------------------------
# Templates


def _shape_area(shape: str) -> float:
    """Area of the shape drawn with radius 1 (shapes.render's polygons)."""
    if shape == "circle":
        return math.pi
    pts = np.array(shapes._shape_polygon(shape, 0.0, 0.0, 1.0))
    x, y = pts[:, 0], pts[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


@functools.lru_cache(maxsize=None)
def _template(shape: str) -> np.ndarray:
    """Boolean raster of the shape at radius _TEMPLATE_R, centred in a _TEMPLATE_RES square."""
    c, r = _TEMPLATE_RES / 2, _TEMPLATE_R
    img = Image.new("L", (_TEMPLATE_RES, _TEMPLATE_RES), 0)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
    else:
        draw.polygon(shapes._shape_polygon(shape, c, c, r), fill=255)
    return np.asarray(img) > 127


SHAPE_AREA = {s: _shape_area(s) for s in shapes.SHAPES}


def template_coverage(shape: str, cx: float, cy: float, radius: float, x0: int, y0: int, w: int,
                      h: int) -> np.ndarray:
    """Coverage [h, w] of pixels x0..x0+w-1, y0..y0+h-1 by the shape at (cx, cy) (pixel units, pixel
    (i, j) spans [i, i+1)) with the given radius, by _SS x _SS point sampling."""
    t = _template(shape)
    sub = (np.arange(_SS) + 0.5) / _SS
    xs = (x0 + np.arange(w)[:, None] + sub[None, :]).reshape(-1)
    ys = (y0 + np.arange(h)[:, None] + sub[None, :]).reshape(-1)
    scale = _TEMPLATE_R / max(radius, 1e-6)
    u = np.floor((xs - cx) * scale + _TEMPLATE_RES / 2).astype(np.int64)
    v = np.floor((ys - cy) * scale + _TEMPLATE_RES / 2).astype(np.int64)
    uin = (u >= 0) & (u < _TEMPLATE_RES)
    vin = (v >= 0) & (v < _TEMPLATE_RES)
    hit = t[np.clip(v, 0, _TEMPLATE_RES - 1)[:, None], np.clip(u, 0, _TEMPLATE_RES - 1)[None, :]]
    hit &= vin[:, None] & uin[None, :]
    return hit.reshape(h, _SS, w, _SS).mean(axis=(1, 3))


# --------------------------------------------------------------------------------------------------
# Detection


def estimate_background(image: np.ndarray, border: int = 2) -> np.ndarray:
    """Median RGB of the outer ``border`` pixels."""
    img = np.asarray(image, np.float32)
    b = max(1, min(border, min(img.shape[:2]) // 4))
    ring = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3), img[:, :b].reshape(-1, 3),
                           img[:, -b:].reshape(-1, 3)])
    return np.median(ring, axis=0)


def nearest_background(rgb: np.ndarray) -> str:
    return min(shapes.BACKGROUNDS, key=lambda n: float(np.linalg.norm(np.asarray(shapes.BACKGROUNDS[n]) - rgb)))


def _blend_labels(img: np.ndarray, bg: np.ndarray, palette: np.ndarray):
    """Per pixel and colour: alpha [H, W, K] and residual [H, W, K] of the blend model."""
    diff = img - bg                                  # [H, W, 3]
    d = palette - bg                                 # [K, 3]
    dd = np.maximum((d * d).sum(-1), 1e-6)           # [K]
    alpha = np.einsum("hwc,kc->hwk", diff, d) / dd   # [H, W, K]
    a = np.clip(alpha, 0.0, 1.0)
    resid = np.linalg.norm(diff[:, :, None, :] - a[..., None] * d[None, None], axis=-1)
    return alpha, resid


def detect(image: np.ndarray, *, min_area: float = MIN_AREA, min_score: float = 0.0,
           palette: Mapping[str, tuple[int, int, int]] | None = None, max_side: int = MAX_SIDE) -> list[Detection]:
    """Detections in a uint8 [H, W, 3] image, highest score first. Images whose shorter side exceeds
    ``max_side`` are first box-downsampled by an integer factor (coordinates are normalised anyway)."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"detect: expected an [H, W, 3] image, got {img.shape}")
    f = -(-min(img.shape[:2]) // max_side)
    if f > 1:
        img = np.asarray(Image.fromarray(img.astype(np.uint8)).resize(
            (img.shape[1] // f, img.shape[0] // f), Image.BOX))
    img = img.astype(np.float32)
    H, W = img.shape[:2]
    palette = dict(shapes.COLORS if palette is None else palette)
    bg = estimate_background(img)
    names = [n for n, c in palette.items() if np.linalg.norm(np.asarray(c, np.float32) - bg) >= MIN_CONTRAST]
    if not names:
        return []
    pal = np.asarray([palette[n] for n in names], np.float32)
    alpha, resid = _blend_labels(img, bg, pal)
    # Candidate colours per pixel: those it blends towards (alpha > 0.1); the best by residual.
    resid_c = np.where(alpha > 0.1, resid, np.inf)
    label = np.argmin(resid_c, axis=-1)
    best_alpha = np.take_along_axis(alpha, label[..., None], -1)[..., 0]
    valid = np.isfinite(np.take_along_axis(resid_c, label[..., None], -1)[..., 0])
    core = valid & (best_alpha >= 0.5)
    min_px = min_area * min(H, W) ** 2

    structure = np.ones((3, 3), bool)
    comp_id = np.zeros((H, W), np.int32)
    colors = [0]  # colour index of each component id (1-based)
    for k in np.unique(label[core]):
        lab, n = ndimage.label(core & (label == k), structure=structure)
        comp_id[lab > 0] = lab[lab > 0] + len(colors) - 1
        colors += [int(k)] * n
    if len(colors) == 1:
        return []
    # Every pixel belongs to the nearest core (a Voronoi split), up to RIM pixels away.
    dist, (iy, ix) = ndimage.distance_transform_edt(comp_id == 0, return_indices=True)
    owner = np.where(dist <= RIM, comp_id[iy, ix], 0)
    boxes = ndimage.find_objects(owner)
    # Cheap pre-filter: coverage before the saturation rescale (which at most multiplies it by 1 / 0.3).
    colors_arr = np.asarray(colors)
    own_alpha = np.take_along_axis(alpha, colors_arr[owner][..., None], -1)[..., 0]
    raw_mass = ndimage.sum(np.clip(own_alpha, -0.5, 1.5), owner, index=np.arange(1, len(colors)))

    dets = []
    for c, sl in enumerate(boxes, start=1):
        if sl is None or raw_mass[c - 1] < 0.3 * min_px:
            continue
        k = colors[c]
        (wy0, wy1), (wx0, wx1) = [(max(0, q.start - 1), min(n, q.stop + 1)) for q, n in zip(sl, (H, W))]
        own = owner[wy0:wy1, wx0:wx1] == c
        mask = comp_id[wy0:wy1, wx0:wx1] == c
        a = np.where(own, np.clip(alpha[wy0:wy1, wx0:wx1, k], -0.5, 1.5), 0.0)
        sat = float(np.percentile(a[mask], 90))
        if 0.3 < sat < 1.0:  # a faded colour: rescale to full coverage
            a = a / sat
        mass = float(a.sum())
        if mass < min_px:
            continue
        ys, xs = np.mgrid[wy0:wy1, wx0:wx1]
        cx = float((a * (xs + 0.5)).sum() / mass)
        cy = float((a * (ys + 0.5)).sum() / mass)
        scores, sq = {}, {}  # 1 - L1 / area and the squared error of each shape's best template
        for s in shapes.SHAPES:
            r = math.sqrt(mass / SHAPE_AREA[s])
            tmpl = template_coverage(s, cx, cy, r, wx0, wy0, wx1 - wx0, wy1 - wy0)
            fits = []
            for sigma in BLURS:
                t = ndimage.gaussian_filter(tmpl, sigma, mode="constant") if sigma else tmpl
                e = a - t
                fits.append((float((e * e).sum()), 1.0 - float(np.abs(e).sum()) / mass))
            sq[s], scores[s] = min(fits)
        shape = min(sq, key=sq.get)
        my, mx = np.nonzero(a >= 0.5)
        if len(mx) == 0:
            continue
        box = ((wx0 + mx.min()) / W, (wy0 + my.min()) / H, (wx0 + mx.max() + 1) / W, (wy0 + my.max() + 1) / H)
        box = tuple(float(v) for v in box)
        center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        score = max(0.0, scores[shape])
        if score < min_score:
            continue
        dets.append(Detection(
            shape=shape, color=names[k], box=box, center=center,
            area=mass / (H * W), score=float(score), shape_scores=scores,
            color_residual=float(np.median(resid[wy0:wy1, wx0:wx1, k][mask]))))
    dets.sort(key=lambda d: -d.score)
    return dets
