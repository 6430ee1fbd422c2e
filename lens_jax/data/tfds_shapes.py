"""The shapes dataset as a tensorflow-datasets builder (ArrayRecord files, no TensorFlow needed).

Features (shared by every dataset the pipeline reads, shapes or a user's own TFDS build):

    image          PNG (or JPEG) bytes, undecoded: the Grain map decodes them with PIL, so a corrupt
                   image is caught and counted instead of crashing inside tfds
    width, height  int32, the stored image size (bucketing needs no decode)
    dense_caption  text
    short_caption  text
    ground_truth   JSON text (see :func:`lens_jax.data.shapes.ground_truth`)
    index          int64, the record's id (for shapes, the scene index)

Layout of a build made by :func:`ensure_shapes_dataset`::

    <root>/lens_params.json                    parameters; written last, so its presence marks completion
    <root>/lens_shapes/1.0.0/...               the tfds builder directory (dataset_info.json, *.array_record*)
    <root>/lens_shapes/1.0.0/lens_sizes-<split>.npy   int32 [N, 2] (width, height) per record position

The whole root is built in a temporary sibling directory and renamed into place, so an interrupted
build never looks complete. Shapes records are written unshuffled: position ``i`` holds scene ``i``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from lens_jax.data import buckets as buckets_lib
from lens_jax.data import shapes

log = logging.getLogger(__name__)

SHAPES_NAME = "lens_shapes"
RECORDS_NAME = "lens_records"
PARAMS_FILE = "lens_params.json"
# Bump when scene sampling, rendering or captions change, so that old builds are not reused.
GENERATOR_VERSION = 2
SPLITS = ("train", "eval")
_STREAM = {"train": 0, "eval": 1}


def features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "width": tfds.features.Scalar(dtype=np.int32),
        "height": tfds.features.Scalar(dtype=np.int32),
        "dense_caption": tfds.features.Text(),
        "short_caption": tfds.features.Text(),
        "ground_truth": tfds.features.Text(),
        "index": tfds.features.Scalar(dtype=np.int64),
    })


def render_size_for(index: int, render_sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Render sizes are used round-robin over the scene index (as in :func:`shapes.make_records`)."""
    return render_sizes[index % len(render_sizes)]


def default_num_workers(num_records: int) -> int:
    """Render processes for a build: none for small builds or machines with fewer than 4 cores.

    On 2 cores a pool was measured to be no faster than rendering in the tfds writer's process
    (~11 s for 20k 64x64 records either way), so it only pays with more cores.
    """
    if num_records < 4096:
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return min(8, cores - 1) if cores >= 4 else 0


class _OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """No downloads, no checksum files.

    tfds looks for a checksums file next to the builder's module; for a class inside a package that
    lookup imports ``importlib_resources``, which is not installed here, so it is switched off.
    """

    url_infos = None
    _checksums_path = None


class LensShapes(_OfflineBuilder):
    """Procedural shapes scenes, rendered at the configured sizes, with dense and short captions."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, num_train: int = 1000, num_eval: int = 100, seed: int = 0,
                 render_sizes: str = "64x64", scene_config: shapes.ShapesConfig | None = None,
                 num_workers: int | None = None, **kwargs):
        self._num = {"train": int(num_train), "eval": int(num_eval)}
        self._num_workers = num_workers
        self._seed = int(seed)
        self._render_sizes = buckets_lib.parse_sizes(render_sizes, field="render_sizes")
        self._scene_config = scene_config
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=features(),
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SPLITS if self._num[split] > 0}

    def _generate_examples(self, split: str):
        n = self._num[split]
        workers = default_num_workers(n) if self._num_workers is None else int(self._num_workers)
        chunk = 512 if workers <= 0 else max(8, min(512, -(-n // (4 * workers))))
        task = functools.partial(_records_chunk, self._seed, _STREAM[split], n, chunk, self._render_sizes,
                                 self._scene_config)
        starts = range(0, n, chunk)
        if workers <= 0:
            chunks = map(task, starts)
            pool = None
        else:  # spawn: safe in a process that already runs JAX threads
            pool = multiprocessing.get_context("spawn").Pool(workers)
            chunks = pool.imap(task, starts)
        try:
            for records in chunks:
                for rec in records:
                    yield rec["index"], rec
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()


def _records_chunk(seed, stream, n, chunk, sizes, config, start):
    return shapes.make_records(seed, stream, start, min(n, start + chunk), sizes, config)


class LensRecords(_OfflineBuilder):
    """Writes given records (dicts with the shared features) as a TFDS dataset: for tests and imports."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, splits: Mapping[str, Sequence[Mapping[str, Any]]] | None = None, **kwargs):
        self._splits = dict(splits or {})
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=features(),
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self._splits}

    def _generate_examples(self, split: str):
        for k, rec in enumerate(self._splits[split]):
            ex = {
                "image": bytes(rec.get("image", b"")),
                "width": int(rec["width"]),
                "height": int(rec["height"]),
                "dense_caption": rec.get("dense_caption", "") or "",
                "short_caption": rec.get("short_caption", "") or "",
                "ground_truth": rec.get("ground_truth", "") or "",
                "index": int(rec.get("index", k)),
            }
            if not isinstance(ex["ground_truth"], str):
                ex["ground_truth"] = json.dumps(ex["ground_truth"], sort_keys=True)
            yield k, ex


def write_tfds_dataset(data_dir: str | os.PathLike,
                       splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Writes records (``image`` bytes, ``width``, ``height``, captions, ...) as ``lens_records``.

    Returns the builder directory, which :func:`open_tfds_source` opens. Record order is kept.
    """
    builder = LensRecords(splits=splits, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)


# --------------------------------------------------------------------------------------------------
# Building the shapes dataset once


def shapes_params(*, num_train: int, num_eval: int, seed: int, render_sizes: str,
                  scene_config: shapes.ShapesConfig | None = None) -> dict[str, Any]:
    sizes = buckets_lib.parse_sizes(render_sizes, field="render_sizes")
    if num_train <= 0:
        raise ValueError(f"num_train: must be positive, got {num_train}")
    if num_eval < 0:
        raise ValueError(f"num_eval: must be >= 0, got {num_eval}")
    return {
        "generator_version": GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_eval": int(num_eval),
        "seed": int(seed),
        "render_sizes": buckets_lib.format_sizes(sizes),
        "scene_config": dataclasses.asdict((scene_config or shapes.DEFAULT_CONFIG).validate()),
    }


def params_hash(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def default_shapes_dir(params: Mapping[str, Any]) -> str:
    """``~/.cache/lens_jax/shapes/<hash of the parameters>``."""
    return os.path.join(os.path.expanduser("~"), ".cache", "lens_jax", "shapes", params_hash(params))


def _read_params(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / PARAMS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(root: Path, params: Mapping[str, Any]) -> bool:
    found = _read_params(root)
    if found is None or json.loads(json.dumps(params)) != found.get("params"):
        return False
    bdir = root / SHAPES_NAME / "1.0.0"
    return (bdir / "dataset_info.json").exists() and all(
        (bdir / f"lens_sizes-{s}.npy").exists() for s in SPLITS if params[f"num_{s}"] > 0)


def ensure_shapes_dataset(data_dir: str | os.PathLike, *, num_train: int, num_eval: int, seed: int = 0,
                          render_sizes: str = "64x64", scene_config: shapes.ShapesConfig | None = None,
                          num_workers: int | None = None) -> str:
    """Builds the shapes dataset at ``data_dir`` unless a complete build with these parameters is there.

    Idempotent. A build with other parameters (or a half-written one) is replaced; a directory that is
    not a shapes build (no ``lens_params.json``) and not empty is never touched: ValueError. Builds go
    to a temporary sibling directory that is renamed into place, so concurrent callers are safe.
    ``num_workers``: render processes (None: the usable cores for builds of 4096+ records, else 0).
    Returns ``data_dir``; :func:`open_source` accepts it.
    """
    params = shapes_params(num_train=num_train, num_eval=num_eval, seed=seed, render_sizes=render_sizes,
                           scene_config=scene_config)
    root = Path(data_dir).expanduser().absolute()
    if _is_complete(root, params):
        return str(root)
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and _read_params(root) is None)):
        raise ValueError(f"data.dir: {str(root)!r} exists and is not a shapes dataset build; "
                         f"choose an empty or new directory")
    root.parent.mkdir(parents=True, exist_ok=True)
    # Processes sharing a disk build once: the others wait here, then find the build complete.
    with _file_lock(root.parent / f".{root.name}.lock"):
        if _is_complete(root, params):
            return str(root)
        return _build_and_swap(root, params, scene_config, num_workers)


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: the rename below still keeps builds atomic
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_and_swap(root: Path, params: Mapping[str, Any], scene_config: shapes.ShapesConfig | None,
                    num_workers: int | None) -> str:
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        _build_into(tmp, params, scene_config, num_workers)
        old = None
        if root.exists():
            if _is_complete(root, params):  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return str(root)
            old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(root, old)
        try:
            os.rename(tmp, root)
        except OSError:
            if _is_complete(root, params):
                shutil.rmtree(tmp, ignore_errors=True)
                return str(root)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(root)


def _build_into(root: Path, params: Mapping[str, Any], scene_config: shapes.ShapesConfig | None,
                num_workers: int | None) -> None:
    log.info("building the shapes dataset in %s: %s", root, params)
    builder = LensShapes(num_train=params["num_train"], num_eval=params["num_eval"], seed=params["seed"],
                         render_sizes=params["render_sizes"], scene_config=scene_config,
                         num_workers=num_workers, data_dir=str(root), file_format="array_record")
    builder.download_and_prepare()  # tfds shows tqdm progress bars per split
    bdir = Path(builder.data_dir)
    sizes = buckets_lib.parse_sizes(params["render_sizes"], field="render_sizes")
    for split in SPLITS:
        n = params[f"num_{split}"]
        if n <= 0:
            continue
        table = np.array([render_size_for(i, sizes) for i in range(n)], np.int32).reshape(n, 2)
        # Records are written unshuffled (position == index); check a few before trusting the sidecar.
        src = builder.as_data_source(split)
        for pos in sorted({0, n // 2, n - 1}):
            rec = src[pos]
            if int(rec["index"]) != pos or (int(rec["width"]), int(rec["height"])) != tuple(table[pos]):
                raise RuntimeError(f"shapes build: record order check failed at position {pos}")
        np.save(bdir / f"lens_sizes-{split}.npy", table)
    relative = os.path.relpath(bdir, root)
    (root / PARAMS_FILE).write_text(json.dumps({"params": params, "builder_dir": relative}, indent=1,
                                               sort_keys=True))


# --------------------------------------------------------------------------------------------------
# Reading


def resolve_builder_dir(path: str | os.PathLike) -> str:
    """The tfds builder directory (holding dataset_info.json) for a build root or builder dir."""
    p = Path(path).expanduser()
    if (p / "dataset_info.json").exists():
        return str(p)
    params = _read_params(p)
    if params is not None and (p / params.get("builder_dir", "")).joinpath("dataset_info.json").exists():
        return str(p / params["builder_dir"])
    found = sorted(p.glob("*/*/dataset_info.json"))
    if len(found) == 1:
        return str(found[0].parent)
    if not found:
        raise FileNotFoundError(f"no TFDS dataset (dataset_info.json) under {str(p)!r}")
    raise ValueError(f"several TFDS datasets under {str(p)!r}: {[str(f.parent) for f in found]}; "
                     f"pass the builder directory")


def open_source(data_dir_or_builder_dir: str | os.PathLike, split: str):
    """A Grain-compatible random-access source (len, getitem) for a split of a build on disk."""
    builder = tfds.builder_from_directory(resolve_builder_dir(data_dir_or_builder_dir))
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} not in {str(data_dir_or_builder_dir)!r}; has "
                         f"{sorted(builder.info.splits)}")
    return builder.as_data_source(split)


def open_tfds_source(name_or_dir: str | os.PathLike, split: str, data_dir: str | os.PathLike | None = None):
    """An existing TFDS dataset with the shared feature names: a directory, or a name under data_dir.

    Never downloads: a name that is not already prepared in ``data_dir`` raises.
    """
    if os.path.isdir(os.path.expanduser(str(name_or_dir))):
        return open_source(name_or_dir, split)
    return tfds.data_source(str(name_or_dir), split=split, data_dir=data_dir, download=False)


def source_builder_dir(source) -> str | None:
    """The builder directory a tfds data source reads from, when it can be told."""
    info = getattr(source, "dataset_info", None)
    d = getattr(info, "data_dir", None)
    return str(d) if d else None


def record_sizes(source, split: str | None = None, *, chunk: int = 1024) -> np.ndarray:
    """int32 [N, 2] (width, height) of every record, in source order, without decoding any image.

    Uses the source's own ``lens_record_sizes()`` if it has one, the ``lens_sizes-<split>.npy`` sidecar
    of a build; otherwise reads the records' stored ``width``/``height`` features (one pass over the source).
    """
    own = getattr(source, "lens_record_sizes", None)  # sources that keep their own table (tfds_folder)
    if callable(own):
        return np.asarray(own(), np.int32)
    n = len(source)
    split = split or getattr(source, "split", None)
    bdir = source_builder_dir(source)
    if bdir and split:
        side = Path(bdir) / f"lens_sizes-{split}.npy"
        if side.exists():
            table = np.load(side)
            if table.shape == (n, 2):
                return table.astype(np.int32)
    out = np.zeros((n, 2), np.int32)
    getitems = getattr(source, "__getitems__", None)
    for start in range(0, n, chunk):
        idx = list(range(start, min(n, start + chunk)))
        recs = getitems(idx) if getitems else [source[i] for i in idx]
        for k, rec in zip(idx, recs):
            out[k] = (int(rec["width"]), int(rec["height"]))
    return out
