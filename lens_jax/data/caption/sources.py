"""Where the images come from: a folder, a list file, or a TFDS dataset.

Every source yields :class:`Item`\\ s with a stable ``key`` (the ledger's identity of an image):

    folder      every image file below it, recursively, sorted; key = the path relative to the
                folder, with "/" separators (hidden files and folders are skipped)
    list file   one image path per line (relative paths are relative to the list file; blank lines
                and lines starting with '#' are skipped; a JSON object line uses its "path" and
                optionally "key"); key = the path as written, else the given "key"
    TFDS        ``tfds:NAME`` (a prepared dataset under ``data_dir``; nothing is downloaded) or a
                directory holding a build (``dataset_info.json`` in it, or a ``lens_params.json``
                build root); key = "split/position"; the image comes from the ``image`` feature
                (encoded bytes, or a decoded array for ``tfds.features.Image``)

Loading happens in the worker threads (:attr:`Item.load`), so a corrupt or missing file only fails
its own item.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif",
                              ".ppm", ".pgm", ".pbm", ".tga", ".ico", ".avif", ".heic"})


@dataclasses.dataclass(frozen=True)
class Item:
    key: str
    source: str  # a path or a tfds reference, for the record
    load: Callable[[], Any]  # -> a path, bytes, an array or a PIL image; may raise (corrupt, missing)


@dataclasses.dataclass
class Source:
    description: str
    kind: str  # "folder", "list" or "tfds"
    items: Sequence[Item] | None = None  # folder and list sources
    _count: int = 0
    _iter: Callable[[], Iterator[Item]] | None = None

    def __len__(self) -> int:
        return len(self.items) if self.items is not None else self._count

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items) if self.items is not None else self._iter()


def _path_loader(path: str) -> Callable[[], str]:
    return lambda: path


def folder_source(root: str | os.PathLike, *, exclude: Sequence[str | os.PathLike] = ()) -> Source:
    root_p = Path(root).expanduser().absolute()
    excluded = {Path(e).expanduser().absolute() for e in exclude}
    items = []
    for dirpath, dirnames, filenames in os.walk(root_p, followlinks=True):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and (d / n) not in excluded)
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            p = d / name
            items.append(Item(p.relative_to(root_p).as_posix(), str(p), _path_loader(str(p))))
    items.sort(key=lambda it: it.key)
    return Source(str(root_p), "folder", items)


def list_source(list_file: str | os.PathLike) -> Source:
    lf = Path(list_file).expanduser().absolute()
    items, seen = [], set()
    for lineno, raw in enumerate(lf.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key = None
        if line.startswith("{"):
            try:
                obj = json.loads(line)
                path, key = str(obj["path"]), obj.get("key")
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{lf}:{lineno}: a JSON line needs a \"path\": {exc}") from None
        else:
            path = line
        p = Path(path).expanduser()
        full = p if p.is_absolute() else lf.parent / p
        key = str(key) if key is not None else Path(path).as_posix()
        if key in seen:
            continue  # listed twice: captioned once
        seen.add(key)
        items.append(Item(key, str(full), _path_loader(str(full))))
    return Source(str(lf), "list", items)


def _is_tfds_dir(p: Path) -> bool:
    return (p / "dataset_info.json").exists() or (p / "lens_params.json").exists() or any(
        p.glob("*/*/dataset_info.json"))


def tfds_source(name_or_dir: str, *, splits: Sequence[str] | None = None, data_dir: str | None = None,
                image_feature: str = "image") -> Source:
    import tensorflow_datasets as tfds

    from lens_jax.data import tfds_shapes

    is_dir = os.path.isdir(os.path.expanduser(name_or_dir))
    if is_dir:
        ref = tfds_shapes.resolve_builder_dir(name_or_dir)
        builder = tfds.builder_from_directory(ref)
    else:
        ref = name_or_dir
        builder = tfds.builder(name_or_dir, data_dir=data_dir)
    available = sorted(builder.info.splits)
    splits = list(splits) if splits else available
    missing = [s for s in splits if s not in builder.info.splits]
    if missing:
        raise ValueError(f"TFDS {name_or_dir!r}: no split(s) {missing}; has {available}")
    if image_feature not in builder.info.features:
        raise ValueError(f"TFDS {name_or_dir!r}: no feature {image_feature!r}; has "
                         f"{sorted(builder.info.features)}")
    sources = {s: tfds_shapes.open_tfds_source(ref if is_dir else name_or_dir, s, data_dir) for s in splits}
    count = sum(len(src) for src in sources.values())
    lock = threading.Lock()

    def loader(split: str, pos: int):
        def load():
            with lock:  # one reader at a time: data sources are not documented as thread-safe
                rec = sources[split][pos]
            return rec[image_feature]
        return load

    def items() -> Iterator[Item]:
        for split in splits:
            for pos in range(len(sources[split])):
                yield Item(f"{split}/{pos}", f"tfds:{ref}:{split}[{pos}]", loader(split, pos))

    return Source(f"tfds:{ref} ({', '.join(splits)})", "tfds", None, count, items)


def open_images(spec: str | os.PathLike, *, splits: Sequence[str] | None = None, tfds_data_dir: str | None = None,
                image_feature: str = "image", exclude: Sequence[str | os.PathLike] = ()) -> Source:
    """The source named by ``spec``: ``tfds:NAME``, a TFDS build directory, an image folder or a list file."""
    spec = str(spec)
    if spec.startswith("tfds:"):
        return tfds_source(spec[5:], splits=splits, data_dir=tfds_data_dir, image_feature=image_feature)
    p = Path(spec).expanduser()
    if p.is_dir():
        if _is_tfds_dir(p):
            return tfds_source(str(p), splits=splits, data_dir=tfds_data_dir, image_feature=image_feature)
        return folder_source(p, exclude=exclude)
    if p.is_file():
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            raise ValueError(f"{spec}: is an image; pass its folder or a list file")
        return list_source(p)
    raise FileNotFoundError(f"image source {spec!r}: no such folder, list file or TFDS dataset")
