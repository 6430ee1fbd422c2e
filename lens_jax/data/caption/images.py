"""Decoding an image for captioning and encoding it as a base64 data URL, no larger than needed.

The caption must describe the pixels the model will be trained on. Image files (folder and list
sources) are therefore turned upright by their EXIF orientation, as the folder TFDS builder
(:mod:`lens_jax.data.tfds_folder`) stores them. TFDS records are taken as stored, because the
training pipeline decodes them without EXIF rotation (``exif_transpose=False``). ``width`` and
``height`` are the full-resolution size of the image so oriented (what a TFDS build of the folder
records), not the resized one.
Anything PIL cannot decode completely (truncated, not an image, a decompression bomb, ...) raises
:class:`UnreadableImage`, which the job records as a failure instead of crashing.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from typing import Any

import numpy as np
from PIL import Image, ImageOps

FORMATS = ("jpeg", "png", "auto")
_ORIENTATION = 0x0112


class UnreadableImage(ValueError):
    """The data is not a decodable image; the message says why."""


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    data_url: str
    width: int  # the stored image's size
    height: int
    sent_width: int  # the size sent to the model (long side <= max_side)
    sent_height: int
    mime: str


def _open(data: Any) -> Image.Image:
    if isinstance(data, Image.Image):
        return data
    if isinstance(data, np.ndarray) and data.dtype != np.object_:
        arr = data
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        return Image.fromarray(arr.astype(np.uint8) if arr.dtype != np.uint8 else arr)
    if isinstance(data, np.ndarray):  # an object scalar holding bytes (tfds Tensor(dtype=object))
        data = data.item()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(data)))
    return Image.open(data)  # a path or a file object


def _to_rgb(img: Image.Image) -> tuple[Image.Image, bool]:
    """RGB pixels and whether the image had transparency (composited onto white)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), True
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 0 else 1.0
        return Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8)).convert("RGB"), False
    return (img if img.mode == "RGB" else img.convert("RGB")), False


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(_ORIENTATION, 1))
        return value if 1 <= value <= 8 else 1
    except Exception:  # a broken EXIF block is ignored, as decoders do
        return 1


def encode_image(data: Any, *, max_side: int = 768, fmt: str = "jpeg", quality: int = 90,
                 exif_transpose: bool = False) -> EncodedImage:
    """``data``: a path, bytes, a uint8 array [H, W(, C)] or a PIL image. Raises UnreadableImage.

    The long side is reduced to ``max_side`` (never enlarged). ``fmt``: "jpeg" (smallest), "png"
    (lossless) or "auto" (PNG for images with transparency or palettes, else JPEG).
    ``exif_transpose``: apply the EXIF orientation first (width and height are then the upright size).
    """
    if fmt not in FORMATS:
        raise ValueError(f"image format must be one of {FORMATS}, got {fmt!r}")
    if max_side < 16:
        raise ValueError(f"max_side must be >= 16, got {max_side}")
    try:
        img = _open(data)
        width, height = img.size
        if width <= 0 or height <= 0:
            raise UnreadableImage(f"empty image ({width}x{height})")
        was_palette = img.mode == "P"
        orientation = _orientation(img) if exif_transpose else 1
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        if getattr(img, "format", None) == "JPEG":
            img.draft("RGB", (max_side, max_side))  # decode large JPEGs at a reduced scale: much faster
        img.load()  # decode everything now: truncated files fail here
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        rgb, had_alpha = _to_rgb(img)
        if max(rgb.size) > max_side:
            scale = max_side / max(rgb.size)
            size = (max(1, round(rgb.size[0] * scale)), max(1, round(rgb.size[1] * scale)))
            rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    except UnreadableImage:
        raise
    except Exception as exc:  # OSError, SyntaxError, DecompressionBombError, ValueError, ...
        msg = str(exc).strip() or type(exc).__name__
        raise UnreadableImage(f"{type(exc).__name__}: {msg}"[:300]) from exc
    use_png = fmt == "png" or (fmt == "auto" and (had_alpha or was_palette))
    buf = io.BytesIO()
    if use_png:
        rgb.save(buf, format="PNG", optimize=False)
        mime = "image/png"
    else:
        rgb.save(buf, format="JPEG", quality=int(quality))
        mime = "image/jpeg"
    url = f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
    return EncodedImage(url, int(width), int(height), int(rgb.size[0]), int(rgb.size[1]), mime)
