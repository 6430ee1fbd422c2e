"""A user's images + captions as a tensorflow-datasets build (ArrayRecord, no TensorFlow), and readers
for TFDS datasets that are not ours.

Building (:func:`build_image_folder_dataset`, CLI ``python -m lens_jax.data.build``)::

    images_dir/            any tree of image files (.jpg .jpeg .png .webp .bmp .gif .tif ...)
    captions.jsonl         one JSON object per line (the captioner's output, or your own):
                             the image:  "key" | "file" | "file_name" | "filename" | "path" | "image"
                                         (a path relative to images_dir, '/'-separated)
                             captions:   "dense_caption" | "caption" | "text"    (the long caption)
                                         "short_caption" | "short"                (optional)
                           a missing short caption is the dense one and vice versa; a line with an
                           "error" field and no caption (a failed captioning) skips its image; later
                           lines for the same image override earlier ones (a resumed captioner).
                           Without a captions file, ``<image>.txt`` next to each image is its caption.

gives, in ``out_dir``::

    out_dir/lens_params.json                  build parameters; written last: marks a complete build
    out_dir/build_report.json                 counts, and every skipped / re-encoded file with the reason
    out_dir/<name>/1.0.0/dataset_info.json    the tfds builder directory (+ *.array_record-* shards)
    out_dir/<name>/1.0.0/lens_sizes-<split>.npy   int32 [N, 2] (width, height) by record position

with the features shared by every dataset the pipeline reads (:func:`tfds_shapes.features`): ``image``
is the file's original encoded bytes when PIL reads them and they decode to what we record (JPEG, PNG,
WEBP; RGB, grey or opaque palette), else a PNG re-encoding (alpha composited over white, CMYK / 16 bit
converted, EXIF orientation applied, first frame of an animation, other formats); ``width``/``height``
the stored image's size, read from the header; ``ground_truth`` is ``{"key": <relative path>}``;
``index`` the record's position in its split. Splits: ``eval`` = the ``eval_count`` usable images with
the smallest SHA-256 of their key (deterministic, stable when images are added), ``train`` = the rest;
records in each split are ordered by that hash.

Every candidate image is opened and (by default) fully decoded once, so a corrupt or truncated file is
skipped and reported instead of failing later; images without a caption are skipped and reported too;
captions naming no image are counted. The build runs in a temporary sibling directory renamed into
place: an interrupted build never looks complete, and running it again starts over (the stale
temporary directory is removed). Building into an existing complete build replaces it; a non-empty
directory that is not a build is never touched.

Reading other TFDS datasets (:func:`open_tfds_dataset`): a dataset with the shared features is read as
is; any other is mapped: the image feature (``image``, or the only Image feature) is read undecoded,
the caption comes from ``dense_caption`` / ``caption`` / ``text`` / ``captions/text`` / ``prompt``
(first element of a sequence), sizes from ``width``/``height`` features or else from the image headers
in a one-time pass cached in a ``lens_sizes-<split>.npy`` sidecar.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import types
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from lens_jax.data import tfds_shapes

log = logging.getLogger(__name__)

DEFAULT_NAME = "lens_image_folder"
REPORT_FILE = "build_report.json"
KIND = "image_folder"
BUILD_VERSION = 1

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".ppm",
    ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k", ".ico", ".avif", ".heic",
})
# Stored as the original bytes (when the mode needs no conversion): formats any PIL decodes.
KEEP_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP"})
KEEP_MODES = frozenset({"RGB", "L", "1", "P"})

KEY_FIELDS = ("key", "file", "file_name", "filename", "path", "image")
DENSE_FIELDS = ("dense_caption", "caption", "text")
SHORT_FIELDS = ("short_caption", "short")

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_ORIENTATION = 0x0112


# --------------------------------------------------------------------------------------------------
# Captions


@dataclasses.dataclass(frozen=True)
class Caption:
    key: str
    dense: str
    short: str
    line: int            # 1-based line in the captions file (0 for .txt sidecars)
    error: str = ""      # a failed captioning: the image is skipped with this reason


def normalize_key(key: str, images_dir: str | os.PathLike | None = None) -> str:
    """A caption key as a '/'-separated path relative to ``images_dir`` (absolute paths inside it too)."""
    k = key.strip().replace("\\", "/")
    if images_dir is not None and os.path.isabs(k):
        try:
            k = os.path.relpath(k, os.path.abspath(images_dir)).replace(os.sep, "/")
        except ValueError:  # another drive (Windows)
            pass
    k = os.path.normpath(k).replace(os.sep, "/")
    return k[2:] if k.startswith("./") else k


def _first_field(obj: Mapping[str, Any], fields: Sequence[str], where: str, *, kind: str) -> tuple[str | None, Any]:
    for f in fields:
        if f in obj and obj[f] is not None:
            v = obj[f]
            if not isinstance(v, str):
                raise ValueError(f"{where}: field {f!r} ({kind}) must be a string, got {type(v).__name__} {v!r:.60}")
            return f, v
    return None, None


def read_captions(path: str | os.PathLike, images_dir: str | os.PathLike | None = None
                  ) -> tuple[dict[str, Caption], dict[str, Any]]:
    """Parses a captions JSONL file: ``({key: Caption}, stats)``.

    Raises ValueError naming the file, the line number and the field for a malformed line (not JSON,
    not an object, no image key field, a non-string field, neither a caption nor an "error").
    """
    path = Path(path)
    out: dict[str, Caption] = {}
    stats = {"lines": 0, "blank_lines": 0, "duplicate_keys": 0, "captioner_errors": 0}
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                stats["blank_lines"] += 1
                continue
            stats["lines"] += 1
            try:
                obj = json.loads(raw)
            except ValueError as e:
                raise ValueError(f"{where}: not valid JSON ({e}): {raw.strip()[:80]!r}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            kf, key = _first_field(obj, KEY_FIELDS, where, kind="the image path")
            if kf is None or not key.strip():
                raise ValueError(f"{where}: no image path: expected a non-empty field, one of {list(KEY_FIELDS)}")
            _, dense = _first_field(obj, DENSE_FIELDS, where, kind="the dense caption")
            _, short = _first_field(obj, SHORT_FIELDS, where, kind="the short caption")
            error = obj.get("error")
            if dense is None and short is None:
                if error:
                    stats["captioner_errors"] += 1
                else:
                    raise ValueError(f"{where}: no caption: expected a string field, one of "
                                     f"{list(DENSE_FIELDS + SHORT_FIELDS)} (or an 'error' field)")
            dense, short = (dense or "").strip(), (short or "").strip()
            nk = normalize_key(key, images_dir)
            if nk in out:
                stats["duplicate_keys"] += 1
            out[nk] = Caption(key=nk, dense=dense or short, short=short or dense, line=lineno,
                              error=str(error) if (error and not (dense or short)) else "")
    return out, stats


def sidecar_captions(images_dir: Path, keys: Iterable[str]) -> dict[str, Caption]:
    """``<image>.txt`` next to each image (stem + .txt) as its caption, when present."""
    out = {}
    for key in keys:
        txt = (images_dir / key).with_suffix(".txt")
        if txt.is_file():
            text = txt.read_text(encoding="utf-8", errors="replace").strip()
            out[key] = Caption(key=key, dense=text, short=text, line=0)
    return out


# --------------------------------------------------------------------------------------------------
# Images


@dataclasses.dataclass
class ImageItem:
    key: str
    ok: bool = False
    reason: str = ""            # why it was skipped
    width: int = 0              # of the stored image
    height: int = 0
    format: str = ""
    nbytes: int = 0
    reencode: str = ""          # why it is stored re-encoded as PNG ('' = original bytes)
    sort_key: str = ""          # sha256 of the key: split and order


def list_images(images_dir: str | os.PathLike) -> list[str]:
    """Image files (by extension, case-insensitive) under ``images_dir``, recursively, hidden ones left
    out; '/'-separated relative paths, sorted."""
    root = Path(images_dir)
    found = []
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or a directory linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if fn.startswith(".") or os.path.splitext(fn)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            found.append(os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/"))
    return sorted(found)


def _inside(key: str) -> bool:
    """A normalised key that stays inside the images folder (no absolute path, no '..')."""
    return not (os.path.isabs(key) or key == ".." or key.startswith("../"))


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as decoders do
        return 1


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def inspect_image(path: str | os.PathLike, key: str, *, verify: bool = True) -> ImageItem:
    """Size (from the header), format, whether it must be re-encoded; with ``verify`` also a full decode,
    so that truncated or corrupt files are caught. Never raises: a bad file gets ``ok=False``."""
    item = ImageItem(key=key, sort_key=key_hash(key))
    try:
        item.nbytes = os.path.getsize(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, EXIF warnings
            with Image.open(path) as im:
                item.format = im.format or ""
                w, h = im.size
                orient = _orientation(im)
                frames = getattr(im, "n_frames", 1)
                reasons = []
                if item.format not in KEEP_FORMATS:
                    reasons.append(f"format {item.format or 'unknown'}")
                if frames > 1 and item.format != "MPO":
                    reasons.append(f"{frames} frames")
                if orient != 1:
                    reasons.append(f"EXIF orientation {orient}")
                alpha = _has_alpha(im)
                if verify:
                    im.load()
                    if alpha and im.mode in ("RGBA", "LA") and im.getchannel("A").getextrema() == (255, 255):
                        alpha = False  # fully opaque: dropping alpha changes nothing
                if alpha:
                    reasons.append(f"alpha ({im.mode})")
                elif im.mode not in KEEP_MODES and im.mode not in ("RGBA", "LA"):
                    reasons.append(f"mode {im.mode}")
        if w <= 0 or h <= 0:
            raise ValueError(f"empty image {w}x{h}")
        if orient in (5, 6, 7, 8):
            w, h = h, w
        item.width, item.height = int(w), int(h)
        item.reencode = ", ".join(reasons)
        item.ok = True
    except Exception as e:  # noqa: BLE001 - any failure skips the file, with the reason
        item.ok = False
        item.reason = f"unreadable image ({type(e).__name__}: {str(e)[:200]})"
    return item


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB for any PIL mode: alpha composited over white, 16/32-bit scaled to 8 bits."""
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, np.float64)
        top = 65535.0 if (im.mode.startswith("I;16") or a.max(initial=0) > 255) else 255.0
        if im.mode == "F" and a.max(initial=0) <= 1.0:
            top = 1.0
        a = np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return im.convert("RGB")


def encoded_bytes(path: str | os.PathLike, item: ImageItem) -> bytes:
    """The bytes stored for an inspected image: the file's, or a PNG re-encoding (see the module doc)."""
    data = Path(path).read_bytes()
    if not item.reencode:
        if len(data) != item.nbytes:
            raise RuntimeError(f"{path}: changed during the build ({item.nbytes} -> {len(data)} bytes)")
        return data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)
            im = ImageOps.exif_transpose(im) or im
            rgb = to_rgb(im)
    if rgb.size != (item.width, item.height):
        raise RuntimeError(f"{path}: changed during the build (size {item.width}x{item.height} -> "
                           f"{rgb.size[0]}x{rgb.size[1]})")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _ordered_map(fn: Callable, items: Sequence, workers: int, chunk: int = 256) -> Iterator:
    """``map(fn, items)`` in order, on ``workers`` threads (PIL decodes without the GIL), bounded memory."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(items), chunk):
            yield from pool.map(fn, items[start:start + chunk])


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


# --------------------------------------------------------------------------------------------------
# The builder


class LensImageFolder(tfds_shapes._OfflineBuilder, skip_registration=True):  # noqa: SLF001
    """A user's images with their captions (see :mod:`lens_jax.data.tfds_folder`)."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, images_dir: str | os.PathLike = "", splits: Mapping[str, Sequence[ImageItem]] | None = None,
                 captions: Mapping[str, Caption] | None = None, workers: int = 1, **kwargs):
        self._images_dir = Path(images_dir)
        self._items = {s: list(v) for s, v in (splits or {}).items()}
        self._captions = dict(captions or {})
        self._workers = int(workers)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=(self.__doc__ or "").strip(),
                                     features=tfds_shapes.features(), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split, items in self._items.items() if items}

    def _generate_examples(self, split: str):
        items = self._items[split]

        def load(item: ImageItem) -> bytes:
            return encoded_bytes(self._images_dir / item.key, item)

        for pos, (item, data) in enumerate(zip(items, _ordered_map(load, items, self._workers))):
            cap = self._captions[item.key]
            # disable_shuffling: tfds writes records sorted by these integer keys, so position == pos.
            yield pos, {
                "image": data,
                "width": item.width,
                "height": item.height,
                "dense_caption": cap.dense,
                "short_caption": cap.short,
                "ground_truth": json.dumps({"key": item.key}),
                "index": pos,
            }


def builder_class(name: str) -> type:
    """:class:`LensImageFolder` under another dataset name (the directory ``out_dir/<name>/``)."""
    if not _NAME_RE.match(name or ""):
        raise ValueError(f"name: {name!r} is not a valid dataset name (lower case letters, digits and "
                         f"underscores, starting with a letter)")
    if name == DEFAULT_NAME:
        return LensImageFolder
    return types.new_class(f"LensImageFolder_{name}", (LensImageFolder,), {"skip_registration": True},
                           lambda ns: ns.update({"name": name, "__module__": __name__}))


# --------------------------------------------------------------------------------------------------
# Building


@dataclasses.dataclass
class BuildResult:
    out_dir: str
    builder_dir: str
    counts: dict[str, int]
    report_path: str
    report: dict[str, Any]


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / tfds_shapes.PARAMS_FILE).read_text())
    except (OSError, ValueError):
        return None


def build_image_folder_dataset(images_dir: str | os.PathLike, captions: str | os.PathLike | None,
                               out_dir: str | os.PathLike, *, eval_count: int, name: str = DEFAULT_NAME,
                               verify: bool = True, workers: int | None = None,
                               progress: bool = False) -> BuildResult:
    """Builds a TFDS dataset (train + eval) from an image folder and its captions; see the module doc.

    ``captions``: a JSONL file, or None for ``<image>.txt`` sidecars. ``eval_count``: held-out records
    (0: no eval split). ``verify``: fully decode every image once (catches truncated files; else only
    the header is read). ``workers``: threads for reading and decoding (default: up to 8 cores).
    Returns the counts and the report (also in ``out_dir/build_report.json``). Raises ValueError when
    nothing usable is left, or ``out_dir`` is a non-empty directory that is not a build.
    """
    t0 = time.time()
    images_dir = Path(images_dir).expanduser().absolute()
    if not images_dir.is_dir():
        raise ValueError(f"images: {str(images_dir)!r} is not a directory")
    if isinstance(eval_count, bool) or not isinstance(eval_count, (int, np.integer)) or eval_count < 0:
        raise ValueError(f"eval_count: must be an integer >= 0, got {eval_count!r}")
    builder_cls = builder_class(name)
    workers = default_workers() if workers is None else max(1, int(workers))
    root = Path(out_dir).expanduser().absolute()
    if root == images_dir or images_dir in root.parents:
        raise ValueError(f"out: {str(root)!r} must not be inside the images directory")
    ours = (_read_marker(root) or {}).get("kind") == KIND
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not ours)):
        raise ValueError(f"out: {str(root)!r} exists and is not an image-folder build; choose an empty or "
                         f"new directory")

    # Captions.
    listed = list_images(images_dir)
    if captions is not None:
        caps, cap_stats = read_captions(captions, images_dir)
        listed_set = set(listed)
        extra = sorted(k for k in caps if k not in listed_set and _inside(k) and (images_dir / k).is_file())
        candidates = sorted(set(listed) | set(extra))  # a captioned file is an image whatever its name
    else:
        caps = sidecar_captions(images_dir, listed)
        cap_stats = {"lines": len(caps), "sidecar_txt": True}
        candidates = listed
    missing_images = sorted(k for k in caps if not (_inside(k) and (images_dir / k).is_file()))

    # Pass 1: inspect every captioned image (size, decodability, re-encoding).
    skipped: list[dict[str, str]] = []
    to_inspect = []
    for key in candidates:
        cap = caps.get(key)
        if cap is None:
            skipped.append({"file": key, "reason": "no caption"})
        elif cap.error:
            skipped.append({"file": key, "reason": f"captioner error: {cap.error[:200]}"})
        elif not cap.dense:
            skipped.append({"file": key, "reason": "empty caption"})
        else:
            to_inspect.append(key)
    inspect = lambda k: inspect_image(images_dir / k, k, verify=verify)  # noqa: E731
    items: list[ImageItem] = []
    bar = _progress(len(to_inspect), "inspecting images", progress)
    for item in _ordered_map(inspect, to_inspect, workers):
        bar(1)
        if item.ok:
            items.append(item)
        else:
            skipped.append({"file": item.key, "reason": item.reason})
    bar(None)
    skipped.sort(key=lambda s: s["file"])
    if not items:
        hint = ""
        if missing_images and candidates:
            hint = (f" (caption keys must be paths relative to the images folder: a caption names "
                    f"{missing_images[0]!r}, a file there is {candidates[0]!r})")
        raise ValueError(f"no usable images in {str(images_dir)!r}: {len(candidates)} candidates, "
                         f"{_reason_summary(skipped)}; {len(missing_images)} captions name no image{hint}")
    if eval_count >= len(items):
        raise ValueError(f"eval_count: {eval_count} would leave no training records ({len(items)} usable "
                         f"images)")
    items.sort(key=lambda it: it.sort_key)
    splits = {"train": items[eval_count:], "eval": items[:eval_count]}

    report = {
        "images_dir": str(images_dir),
        "captions": str(Path(captions).absolute()) if captions is not None else None,
        "name": name,
        "counts": {
            "image_files": len(candidates),
            "caption_lines": int(cap_stats.get("lines", 0)),
            "captions": len(caps),
            "duplicate_caption_keys": int(cap_stats.get("duplicate_keys", 0)),
            "train": len(splits["train"]),
            "eval": len(splits["eval"]),
            "skipped": len(skipped),
            "captions_without_image": len(missing_images),
            "reencoded": sum(1 for it in items if it.reencode),
        },
        "skipped_by_reason": _reason_counts(skipped),
        "skipped": skipped,
        "captions_without_image": missing_images,
        "reencoded": [{"file": it.key, "reason": it.reencode} for it in items if it.reencode],
        "verify": bool(verify),
    }

    root.parent.mkdir(parents=True, exist_ok=True)
    with tfds_shapes._file_lock(root.parent / f".{root.name}.lock"):  # noqa: SLF001
        for stale in root.parent.glob(f".{root.name}.building-*"):  # interrupted earlier builds
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
        try:
            builder = builder_cls(images_dir=images_dir, splits=splits, captions=caps, workers=workers,
                                  data_dir=str(tmp), file_format="array_record")
            builder.download_and_prepare()
            bdir = Path(builder.data_dir)
            for split, its in splits.items():
                if its:
                    table = np.array([(it.width, it.height) for it in its], np.int32).reshape(-1, 2)
                    _check_order(builder.as_data_source(split), its)
                    np.save(bdir / f"lens_sizes-{split}.npy", table)
            shutil.rmtree(tmp / "downloads", ignore_errors=True)
            rel = os.path.relpath(bdir, tmp)
            report["builder_dir"] = rel
            report["seconds"] = round(time.time() - t0, 2)
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))
            params = {"kind": KIND, "version": BUILD_VERSION, "name": name, "eval_count": int(eval_count),
                      "images_dir": str(images_dir), "captions": report["captions"], "verify": bool(verify)}
            (tmp / tfds_shapes.PARAMS_FILE).write_text(json.dumps({"params": params, "builder_dir": rel,
                                                                    "kind": KIND}, indent=1, sort_keys=True))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a dataset is shared like any dir
            old = None
            if root.exists():
                old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(root, old)
            os.rename(tmp, root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return BuildResult(out_dir=str(root), builder_dir=str(root / rel), counts=report["counts"],
                       report_path=str(root / REPORT_FILE), report=report)


def _check_order(source, items: Sequence[ImageItem], probes: int = 16) -> None:
    """Records must sit at the positions the sidecar assumes: check a spread of them."""
    n = len(items)
    if len(source) != n:
        raise RuntimeError(f"build: {len(source)} records written, {n} expected")
    for pos in sorted({0, n - 1, *np.linspace(0, n - 1, min(n, probes)).astype(int).tolist()}):
        rec = source[pos]
        it = items[pos]
        key = json.loads(rec["ground_truth"]).get("key")
        size = (int(rec["width"]), int(rec["height"]))
        if int(rec["index"]) != pos or key != it.key or size != (it.width, it.height):
            raise RuntimeError(f"build: record order check failed at position {pos}")


def _reason_counts(skipped: Sequence[Mapping[str, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in skipped:
        r = s["reason"].split(" (")[0].split(":")[0]
        out[r] = out.get(r, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _reason_summary(skipped) -> str:
    c = _reason_counts(skipped)
    return ", ".join(f"{v} {k}" for k, v in c.items()) or "none skipped"


def _progress(total: int, desc: str, enabled: bool):
    if not enabled or total <= 0:
        return lambda n: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="img")

    def step(n):
        if n is None:
            bar.close()
        else:
            bar.update(n)
    return step


# --------------------------------------------------------------------------------------------------
# Reading TFDS datasets that are not ours

OWN_FEATURES = ("image", "width", "height", "dense_caption", "short_caption")
CAPTION_CANDIDATES = ("dense_caption", "caption", "text", "captions/text", "captions", "prompt", "description")


def _lookup(record: Mapping[str, Any], path: str) -> Any:
    v: Any = record
    for part in path.split("/"):
        v = v[part]
    return v


def _feature_at(features, path: str):
    f = features
    for part in path.split("/"):
        if isinstance(f, tfds.features.Sequence):
            f = f.feature
        if not isinstance(f, tfds.features.FeaturesDict) or part not in f.keys():
            return None
        f = f[part]
    return f


def _first_text(value: Any) -> str:
    """Text from a feature value: bytes/str, or the first element of a sequence of them."""
    if isinstance(value, np.ndarray):
        if value.shape == ():
            value = value.item()
        elif value.size:
            value = value.reshape(-1)[0]
        else:
            return ""
    elif isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def image_size(value: Any) -> tuple[int, int]:
    """(width, height) of encoded bytes (header only) or a decoded [H, W, C] array; (0, 0) if unreadable."""
    try:
        if isinstance(value, np.ndarray) and value.ndim >= 2 and value.dtype != object:
            return int(value.shape[1]), int(value.shape[0])
        if isinstance(value, np.ndarray):
            value = value.item()
        with Image.open(io.BytesIO(bytes(value))) as im:
            w, h = im.size
            if _orientation(im) in (5, 6, 7, 8):
                w, h = h, w
            return int(w), int(h)
    except Exception:  # noqa: BLE001 - unreadable: the pipeline masks the record when it decodes it
        return 0, 0


class MappedSource:
    """A TFDS data source whose records are renamed to the shared features (random access, for Grain).

    ``image`` keeps what the source gives (encoded bytes when the feature is a tfds Image, read with
    SkipDecoding; else the array), ``width``/``height`` come from the sizes table, ``index`` is the
    position. An unreadable image gets size (0, 0); it lands in a bucket and is masked when decoded.
    """

    def __init__(self, source, *, split: str, image_key: str, caption_key: str, short_caption_key: str,
                 sizes_cache: str | None):
        self._source = source
        self.split = split
        self.dataset_info = getattr(source, "dataset_info", None)
        self.image_key = image_key
        self.caption_key = caption_key
        self.short_caption_key = short_caption_key
        self._sizes_cache = sizes_cache
        self._sizes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._source)

    def _map(self, pos: int, rec: Mapping[str, Any], size=None) -> dict[str, Any]:
        dense = _first_text(_lookup(rec, self.caption_key))
        short = _first_text(_lookup(rec, self.short_caption_key)) if self.short_caption_key else dense
        image = _lookup(rec, self.image_key)
        if size is None:
            size = self.lens_record_sizes()[pos]
        return {"image": image, "width": int(size[0]), "height": int(size[1]), "dense_caption": dense,
                "short_caption": short or dense, "ground_truth": "", "index": int(pos)}

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i < 0:
            i += len(self)
        return self._map(i, self._source[i])

    def __getitems__(self, idx: Sequence[int]) -> list[dict[str, Any]]:
        getitems = getattr(self._source, "__getitems__", None)
        recs = getitems(list(idx)) if getitems else [self._source[int(i)] for i in idx]
        return [self._map(int(i), r) for i, r in zip(idx, recs)]

    def lens_record_sizes(self) -> np.ndarray:
        """int32 [N, 2]: from the sidecar, else one pass over the headers (then cached in the sidecar)."""
        if self._sizes is not None:
            return self._sizes
        n = len(self)
        if self._sizes_cache and os.path.exists(self._sizes_cache):
            try:
                table = np.load(self._sizes_cache)
                if table.shape == (n, 2):
                    self._sizes = table.astype(np.int32)
                    return self._sizes
            except (OSError, ValueError):
                pass
        t0 = time.time()
        table = np.zeros((n, 2), np.int32)
        feats = getattr(self.dataset_info, "features", None)
        has_wh = feats is not None and all(k in feats.keys() for k in ("width", "height"))
        getitems = getattr(self._source, "__getitems__", None)
        for start in range(0, n, 256):
            idx = list(range(start, min(n, start + 256)))
            recs = getitems(idx) if getitems else [self._source[i] for i in idx]
            for k, rec in zip(idx, recs):
                table[k] = (int(rec["width"]), int(rec["height"])) if has_wh else \
                    image_size(_lookup(rec, self.image_key))
        log.info("sizes of %d records measured in %.1f s", n, time.time() - t0)
        self._sizes = table
        if self._sizes_cache:
            _save_atomic(self._sizes_cache, table)
        return table

    def __repr__(self) -> str:
        return f"MappedSource({self._source!r}, image={self.image_key!r}, caption={self.caption_key!r})"


def _save_atomic(path: str, table: np.ndarray) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}.npy"
        np.save(tmp, table)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not cache record sizes in %s: %s", path, e)


def _sizes_cache_path(builder_dir: str, split: str) -> str:
    """``<builder dir>/lens_sizes-<split>.npy`` when writable, else under ~/.cache/lens_jax/sizes."""
    if builder_dir and os.access(builder_dir, os.W_OK):
        return os.path.join(builder_dir, f"lens_sizes-{split}.npy")
    info = os.path.join(builder_dir, "dataset_info.json")
    stamp = f"{os.path.abspath(builder_dir)}|{split}|{os.path.getmtime(info) if os.path.exists(info) else 0}"
    return os.path.join(os.path.expanduser("~"), ".cache", "lens_jax", "sizes",
                        hashlib.sha256(stamp.encode()).hexdigest()[:16] + f"-{split}.npy")


def is_lens_layout(features) -> bool:
    """True when the features are the shared ones (image bytes, width, height, captions)."""
    keys = set(features.keys())
    return set(OWN_FEATURES) <= keys and not isinstance(features["image"], tfds.features.Image)


def _is_text(f) -> bool:
    """A text feature, or a sequence of text (its first element is used)."""
    if isinstance(f, tfds.features.Sequence):
        f = f.feature
    if isinstance(f, tfds.features.Text):
        return True
    return isinstance(f, tfds.features.Tensor) and np.dtype(f.np_dtype).kind in "SUO"


def feature_mapping(features, *, image_key: str = "", caption_key: str = "",
                    short_caption_key: str = "") -> dict[str, str]:
    """Which features give the image and the captions (explicit keys win; else the documented guesses).

    Raises ValueError listing the dataset's features when no image or caption is found.
    """
    names = list(features.keys())
    if image_key:
        if _feature_at(features, image_key) is None:
            raise ValueError(f"data.image_key: no feature {image_key!r} (features: {names})")
    elif "image" in names:
        image_key = "image"
    else:
        images = [k for k in names if isinstance(features[k], tfds.features.Image)]
        if len(images) != 1:
            raise ValueError(f"data.image_key: cannot tell the image feature among {names}; set it")
        image_key = images[0]
    if caption_key:
        if _feature_at(features, caption_key) is None:
            raise ValueError(f"data.caption_key: no feature {caption_key!r} (features: {names})")
    else:
        found = [c for c in CAPTION_CANDIDATES if _is_text(_feature_at(features, c))]
        if not found:
            raise ValueError(f"data.caption_key: no caption feature among {names} (looked for "
                             f"{list(CAPTION_CANDIDATES)}); set it")
        caption_key = found[0]
    if short_caption_key:
        if _feature_at(features, short_caption_key) is None:
            raise ValueError(f"data.short_caption_key: no feature {short_caption_key!r} (features: {names})")
    elif "short_caption" in names and caption_key != "short_caption":
        short_caption_key = "short_caption"
    return {"image_key": image_key, "caption_key": caption_key, "short_caption_key": short_caption_key}


def open_tfds_dataset(name_or_dir: str | os.PathLike, split: str, *, data_dir: str | os.PathLike | None = None,
                      image_key: str = "", caption_key: str = "", short_caption_key: str = ""):
    """A random-access source with the shared features for any prepared TFDS dataset (never downloads).

    ``name_or_dir``: a build root or builder directory, or a dataset name prepared under ``data_dir``.
    Our own layout is returned as is (:func:`tfds_shapes.open_source`); other datasets are wrapped in a
    :class:`MappedSource` (see :func:`feature_mapping`).
    """
    path = os.path.expanduser(str(name_or_dir))
    if os.path.isdir(path):
        builder = tfds.builder_from_directory(tfds_shapes.resolve_builder_dir(path))
    else:
        try:
            builder = tfds.builder(str(name_or_dir), data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            builder = None
        if builder is None or not builder.is_prepared():
            raise FileNotFoundError(f"data.name: TFDS dataset {str(name_or_dir)!r} is not prepared in "
                                    f"data_dir={data_dir!r} (nothing is downloaded)")
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} not in {str(name_or_dir)!r}; has {sorted(builder.info.splits)}")
    features = builder.info.features
    if is_lens_layout(features) and not (image_key or caption_key or short_caption_key):
        return builder.as_data_source(split)
    m = feature_mapping(features, image_key=image_key, caption_key=caption_key,
                        short_caption_key=short_caption_key)
    top = m["image_key"].split("/")[0]
    decoders = {top: tfds.decode.SkipDecoding()} if isinstance(features[top], tfds.features.Image) else None
    source = builder.as_data_source(split, decoders=decoders)
    return MappedSource(source, split=split, sizes_cache=_sizes_cache_path(str(builder.data_dir), split), **m)


__all__ = [
    "BuildResult", "Caption", "ImageItem", "LensImageFolder", "MappedSource", "build_image_folder_dataset",
    "builder_class", "feature_mapping", "image_size", "inspect_image", "list_images", "open_tfds_dataset",
    "read_captions", "to_rgb",
]
