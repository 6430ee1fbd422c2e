"""Aspect-ratio buckets: parsing ``"64x64,48x80"`` (W x H) specs, assignment, resize + centre crop."""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
from PIL import Image

Size = tuple[int, int]  # (width, height)

_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_sizes(spec: str, *, field: str = "buckets") -> list[Size]:
    """``"64x64, 48x80"`` -> ``[(64, 64), (48, 80)]`` (width x height). Raises ValueError naming ``field``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{field}: expected a comma-separated list of WxH sizes like '64x64,48x80', "
                         f"got {spec!r}")
    sizes: list[Size] = []
    for part in spec.split(","):
        m = _SIZE_RE.match(part)
        if not m:
            raise ValueError(f"{field}: malformed size {part.strip()!r} in {spec!r} (expected WxH, "
                             f"e.g. '64x64')")
        w, h = int(m.group(1)), int(m.group(2))
        if w <= 0 or h <= 0:
            raise ValueError(f"{field}: sizes must be positive, got {part.strip()!r}")
        if (w, h) in sizes:
            raise ValueError(f"{field}: duplicate size {w}x{h} in {spec!r}")
        sizes.append((w, h))
    return sizes


def format_sizes(sizes: Sequence[Size]) -> str:
    return ",".join(f"{w}x{h}" for w, h in sizes)


def parse_weights(spec: str | float | int | Sequence[float], n: int, *,
                  field: str = "bucket_weights") -> list[float]:
    """Weights for ``n`` buckets: one value (broadcast) or exactly ``n``; non-negative, sum > 0."""
    if isinstance(spec, (int, float)):
        values = [float(spec)]
    elif isinstance(spec, str):
        if not spec.strip():
            values = [1.0]
        else:
            try:
                values = [float(v) for v in spec.split(",")]
            except ValueError:
                raise ValueError(f"{field}: malformed weights {spec!r} (expected e.g. '1' or '2,1,1')") \
                    from None
    else:
        values = [float(v) for v in spec]
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise ValueError(f"{field}: {len(values)} weights for {n} buckets ({spec!r})")
    if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"{field}: weights must be finite, non-negative and not all zero, got {spec!r}")
    return values


def assign_bucket(width: int, height: int, buckets: Sequence[Size]) -> int:
    """Index of the bucket with the nearest log aspect ratio (ties: the first; then nearest area)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    la = math.log(width / height)
    best, best_key = 0, None
    for i, (bw, bh) in enumerate(buckets):
        key = (round(abs(math.log(bw / bh) - la), 9), abs(math.log((bw * bh) / (width * height))))
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


def assign_buckets(widths: np.ndarray, heights: np.ndarray, buckets: Sequence[Size]) -> np.ndarray:
    """Vectorised :func:`assign_bucket` for arrays of sizes; returns int32 bucket ids."""
    widths = np.asarray(widths, np.float64)
    heights = np.asarray(heights, np.float64)
    out = np.zeros(widths.shape, np.int32)
    if widths.size == 0:
        return out
    cache: dict[tuple[int, int], int] = {}
    for k, (w, h) in enumerate(zip(widths.astype(np.int64).tolist(), heights.astype(np.int64).tolist())):
        key = (w, h)
        if key not in cache:
            cache[key] = assign_bucket(w, h, buckets)
        out[k] = cache[key]
    return out


def resize_crop(image: np.ndarray | Image.Image, size: Size, *,
                resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
    """Scales ``image`` to cover ``size`` = (width, height), then centre-crops; uint8 [H, W, 3].

    Deterministic; a no-op (apart from RGB conversion) when the image already has that size.
    """
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    if img.mode != "RGB":
        img = img.convert("RGB")
    tw, th = size
    w, h = img.size
    if (w, h) != (tw, th):
        scale = max(tw / w, th / h)
        nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), resample)
        left, top = (nw - tw) // 2, (nh - th) // 2
        img = img.crop((left, top, left + tw, top + th))
    return np.asarray(img, dtype=np.uint8)
