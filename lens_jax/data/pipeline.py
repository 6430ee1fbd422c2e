"""The training input pipeline (Grain): source -> buckets -> global batches -> this process's rows.

    source (shapes build or a TFDS dataset with the shared features, see tfds_shapes)
      -> bucket every record from its stored width/height (no decode), nearest log aspect ratio
      -> per bucket: shuffle (seeded, the same on every process; shuffle before repeat reshuffles
         every epoch), repeat, map (decode PNG, resize + centre crop to the bucket, choose the
         caption, tokenize), batch(global_batch_size // process_count, drop_remainder=True),
         then every process_count-th batch starting at process_index
      -> deterministic weighted mix of the buckets (every process picks the same bucket at a step)
      -> to_iter_dataset(ReadOptions(worker_threads, prefetch))

So the global batch of a step (the processes' rows in process order) is the same whatever the
number of processes: a run on 2 hosts trains exactly the steps of a run on 1. The map is lazy, so
each process reads and decodes only its own rows.

Each batch is a dict of numpy arrays (``b = global_batch_size // process_count``):

    images     uint8   [b, H, W, 3]   (H, W) of this step's bucket
    text_ids   int32   [b, max_text_len]   right-padded with 0 (<pad>)
    text_mask  bool    [b, max_text_len]
    valid      float32 [b]   0 for a record whose image is corrupt / unreadable or whose chosen caption
                             is missing or empty: its image is zeros and its mask all false; the train
                             step masks it out of the loss and counts it

With ``data.source='precomputed'`` (``data.dir`` = the output of ``python -m lens_jax.data.precompute``)
the same steps hold the same examples as ``latents`` / ``text_hidden`` / ``text_mask`` / ``valid``
instead of ``images`` / ``text_ids`` / ``text_mask`` / ``valid``; see :mod:`lens_jax.data.precomputed`.

``iter(dataset)`` is a checkpointable ``grain.DatasetIterator`` (get_state / set_state).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np
from PIL import Image

from lens_jax.data import buckets as buckets_lib
from lens_jax.data import shapes
from lens_jax.data import tfds_shapes
from lens_jax.data import tfds_folder
from lens_jax.data import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

CAPTION_MODES = ("dense", "short", "mix")
SOURCES = ("shapes", "tfds", "precomputed")


def default_data_config() -> ml_collections.ConfigDict:
    """The ``data`` section of a run config, with the tiny-demo defaults."""
    return ml_collections.ConfigDict({
        "source": "shapes",        # 'shapes' (procedural, built on first use) | 'tfds' | 'precomputed'
                                   # (data.dir = the output of python -m lens_jax.data.precompute)
        "dir": "",                 # dataset dir; '' = ~/.cache/lens_jax/shapes/<params hash> for shapes
        "name": "",                # tfds dataset name (source='tfds'), read from `dir` as data_dir
        "num_train": 20000,        # shapes: train records
        "num_eval": 200,           # shapes: eval records
        "dataset_seed": 0,         # shapes: seed of the scenes (independent of the training seed)
        "render_sizes": "64x64",   # shapes: WxH sizes, used round-robin over the scenes
        "buckets": "64x64",        # WxH buckets; '' = the render sizes
        "bucket_weights": "1",     # one weight for all buckets or one per bucket, e.g. '2,1,1'
        "caption": "dense",        # 'dense' | 'short' | 'mix'
        "dense_ratio": 0.5,        # 'mix': probability of the dense caption
        "max_text_len": 160,       # tokens; longer captions are truncated
        "worker_threads": 2,       # Grain read threads (0: read in the training thread)
        "prefetch": 4,             # batches read ahead
    })


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """A validated ``data`` config."""

    source: str
    dir: str
    name: str
    num_train: int
    num_eval: int
    dataset_seed: int
    render_sizes: str
    buckets: tuple[tuple[int, int], ...]
    weights: tuple[float, ...]
    caption: str
    dense_ratio: float
    max_text_len: int
    worker_threads: int
    prefetch: int
    scene_config: shapes.ShapesConfig | None


def _get(cfg: Any, field: str, default: Any) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(field, default)
    try:
        return cfg.get(field, default)
    except AttributeError:
        return getattr(cfg, field, default)


def _int_field(cfg: Any, field: str, default: int, *, minimum: int) -> int:
    value = _get(cfg, field, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"data.{field}: expected an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"data.{field}: must be >= {minimum}, got {value}")
    return int(value)


def validate_data_config(cfg: Any) -> DataSettings:
    """Checks a ``data`` config; raises ValueError naming the offending field."""
    d = default_data_config()
    source = _get(cfg, "source", d.source)
    if source not in SOURCES:
        raise ValueError(f"data.source: unknown source {source!r} (expected one of {SOURCES})")
    caption = _get(cfg, "caption", d.caption)
    if caption not in CAPTION_MODES:
        raise ValueError(f"data.caption: unknown caption mode {caption!r} (expected one of "
                         f"{CAPTION_MODES})")
    ratio = _get(cfg, "dense_ratio", d.dense_ratio)
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"data.dense_ratio: expected a number in [0, 1], got {ratio!r}") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"data.dense_ratio: must be in [0, 1], got {ratio}")
    render_sizes = _get(cfg, "render_sizes", d.render_sizes)
    if source == "shapes":
        render_sizes = buckets_lib.format_sizes(buckets_lib.parse_sizes(render_sizes, field="data.render_sizes"))
    bucket_spec = _get(cfg, "buckets", d.buckets)
    if not bucket_spec:
        if source != "shapes":
            raise ValueError("data.buckets: required when data.source='tfds' (e.g. '64x64,48x80')")
        bucket_spec = render_sizes
    bucket_list = tuple(buckets_lib.parse_sizes(bucket_spec, field="data.buckets"))
    weights = tuple(buckets_lib.parse_weights(_get(cfg, "bucket_weights", d.bucket_weights),
                                              len(bucket_list), field="data.bucket_weights"))
    name = str(_get(cfg, "name", d.name) or "")
    data_dir = str(_get(cfg, "dir", d.dir) or "")
    if source == "precomputed" and not data_dir:
        raise ValueError("data.dir: required when data.source='precomputed' (the --out directory of "
                         "python -m lens_jax.data.precompute)")
    if source == "tfds" and not name and not data_dir:
        raise ValueError("data.name: required when data.source='tfds' (or set data.dir to a TFDS "
                         "builder directory)")
    scene_overrides = _get(cfg, "scene", None)
    scene_config = None
    if scene_overrides:
        raw = scene_overrides.to_dict() if hasattr(scene_overrides, "to_dict") else dict(scene_overrides)
        known = {f.name for f in dataclasses.fields(shapes.ShapesConfig)}
        bad = sorted(set(raw) - known)
        if bad:
            raise ValueError(f"data.scene: unknown fields {bad} (known: {sorted(known)})")
        raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        try:
            scene_config = shapes.ShapesConfig(**raw).validate()
        except ValueError as e:
            raise ValueError(f"data.scene: {e}") from None
    return DataSettings(
        source=source,
        dir=data_dir,
        name=name,
        num_train=_int_field(cfg, "num_train", d.num_train, minimum=1),
        num_eval=_int_field(cfg, "num_eval", d.num_eval, minimum=0),
        dataset_seed=_int_field(cfg, "dataset_seed", d.dataset_seed, minimum=0),
        render_sizes=render_sizes,
        buckets=bucket_list,
        weights=weights,
        caption=caption,
        dense_ratio=ratio,
        max_text_len=_int_field(cfg, "max_text_len", d.max_text_len, minimum=1),
        worker_threads=_int_field(cfg, "worker_threads", d.worker_threads, minimum=0),
        prefetch=_int_field(cfg, "prefetch", d.prefetch, minimum=0),
        scene_config=scene_config,
    )


# --------------------------------------------------------------------------------------------------
# Sources


def dataset_dir(data_cfg: Any) -> str:
    """Where the data lives; for shapes, builds it first if needed (idempotent)."""
    s = validate_data_config(data_cfg)
    if s.source == "shapes":
        params = tfds_shapes.shapes_params(num_train=s.num_train, num_eval=s.num_eval, seed=s.dataset_seed,
                                           render_sizes=s.render_sizes, scene_config=s.scene_config)
        root = s.dir or tfds_shapes.default_shapes_dir(params)
        return tfds_shapes.ensure_shapes_dataset(root, num_train=s.num_train, num_eval=s.num_eval,
                                                 seed=s.dataset_seed, render_sizes=s.render_sizes,
                                                 scene_config=s.scene_config)
    return s.dir


def open_split(data_cfg: Any, split: str):
    """The random-access source of ``split`` for a ``data`` config (shapes: built on first use)."""
    s = validate_data_config(data_cfg)
    if s.source == "shapes":
        return tfds_shapes.open_source(dataset_dir(data_cfg), split)
    # Any prepared TFDS dataset: ours as is, others mapped to the shared features (see tfds_folder).
    keys = {k: str(_get(data_cfg, k, "") or "") for k in ("image_key", "caption_key", "short_caption_key")}
    if s.name:
        return tfds_folder.open_tfds_dataset(s.name, split, data_dir=s.dir or None, **keys)
    return tfds_folder.open_tfds_dataset(s.dir, split, **keys)


class _Subset:
    """Random access to ``source[indices[i]]``."""

    def __init__(self, source, indices: np.ndarray):
        self._source = source
        self._indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int):
        return self._source[int(self._indices[i])]

    def __repr__(self) -> str:
        return f"_Subset({len(self)} of {type(self._source).__name__})"


def bucket_slices(sizes: np.ndarray, bucket_list: Sequence[tuple[int, int]],
                  weights: Sequence[float]) -> list[tuple[int, np.ndarray]]:
    """``[(bucket id, record positions)]`` for the buckets in use (positive weight, at least one record)."""
    ids = buckets_lib.assign_buckets(sizes[:, 0], sizes[:, 1], bucket_list) if len(sizes) else \
        np.zeros((0,), np.int32)
    out = []
    for b in range(len(bucket_list)):
        members = np.flatnonzero(ids == b)
        if weights[b] > 0 and len(members):
            out.append((b, members))
    return out


# --------------------------------------------------------------------------------------------------
# The per-record map


def _mix64(*values: int) -> int:
    """A stable 64-bit hash of integers (splitmix64 steps)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x


def caption_field(mode: str, dense_ratio: float, seed: int, key: int, epoch: int) -> str:
    """'dense_caption' or 'short_caption': the caption a record trains with in an epoch ('mix': a stable
    hash of (seed, key, epoch) against dense_ratio). Shared by the raw and the precomputed pipelines."""
    if mode == "dense":
        return "dense_caption"
    if mode == "short":
        return "short_caption"
    u = _mix64(seed, key, epoch, 0xCA) / 2.0**64
    return "dense_caption" if u < dense_ratio else "short_caption"


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _as_text(value.item())
    return str(value)


def decode_image(value: Any) -> np.ndarray | None:
    """PNG/JPEG bytes (or an already decoded uint8 array) -> uint8 [H, W, 3]; None if unreadable."""
    try:
        if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
            img = value
            if img.shape[-1] == 1:
                img = np.repeat(img, 3, axis=-1)
            return img[..., :3] if img.shape[-1] >= 3 and min(img.shape[:2]) > 0 else None
        if isinstance(value, np.ndarray) and value.shape == ():
            value = value.item()
        if not isinstance(value, (bytes, bytearray, np.bytes_)) or not value:
            return None
        with Image.open(io.BytesIO(bytes(value))) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception:  # noqa: BLE001 - any decoder failure marks the record invalid
        return None


_INVALID_COUNT = itertools.count()  # process-wide, for rate-limited warnings only


class RecordToExample:
    """Turns one record into one training example for a bucket (deterministic, thread-safe)."""

    def __init__(self, *, bucket: tuple[int, int], epoch_len: int, settings: DataSettings, tokenizer,
                 seed: int):
        self.bucket = bucket
        self.epoch_len = max(1, int(epoch_len))
        self.caption = settings.caption
        self.dense_ratio = settings.dense_ratio
        self.max_text_len = settings.max_text_len
        self.tokenizer = tokenizer
        self.seed = int(seed)

    def choose_caption(self, record: dict[str, Any], key: int, epoch: int) -> str:
        field = caption_field(self.caption, self.dense_ratio, self.seed, key, epoch)
        return _as_text(record.get(field)).strip()

    def invalid(self, key: int, reason: str) -> dict[str, np.ndarray]:
        n = next(_INVALID_COUNT) + 1
        if n <= 10 or n % 1000 == 0:
            log.warning("data: record %d is invalid (%s); it gets valid=0 (%d invalid records so far)",
                        key, reason, n)
        w, h = self.bucket
        return {
            "images": np.zeros((h, w, 3), np.uint8),
            "text_ids": np.zeros((self.max_text_len,), np.int32),
            "text_mask": np.zeros((self.max_text_len,), bool),
            "valid": np.float32(0.0),
        }

    def __call__(self, index: int, record: dict[str, Any]) -> dict[str, np.ndarray]:
        try:
            key = int(record.get("index", -1))
        except (TypeError, ValueError):
            key = -1
        epoch = int(index) // self.epoch_len
        caption = self.choose_caption(record, key if key >= 0 else int(index) % self.epoch_len, epoch)
        if not caption:
            return self.invalid(key, "missing or empty caption")
        image = decode_image(record.get("image"))
        if image is None:
            return self.invalid(key, "corrupt or unreadable image")
        try:
            image = buckets_lib.resize_crop(image, self.bucket)
            ids, mask = tokenizer_lib.tokenize(self.tokenizer, [caption], self.max_text_len)
        except Exception as e:  # noqa: BLE001
            return self.invalid(key, f"{type(e).__name__}: {e}")
        if not mask[0].any():
            return self.invalid(key, "caption has no tokens")
        return {"images": image, "text_ids": ids[0], "text_mask": mask[0], "valid": np.float32(1.0)}


# --------------------------------------------------------------------------------------------------
# Datasets


def make_train_dataset(data_cfg: Any, tokenizer, *, global_batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1,
                       split: str = "train") -> grain.IterDataset:
    """The training pipeline for this process; see the module docstring for the batch contract."""
    settings = validate_data_config(data_cfg)
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, (int, np.integer)) \
            or global_batch_size <= 0:
        raise ValueError(f"global_batch_size: must be a positive integer, got {global_batch_size!r}")
    if isinstance(process_count, bool) or not isinstance(process_count, (int, np.integer)) \
            or process_count <= 0:
        raise ValueError(f"process_count: must be a positive integer, got {process_count!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index: must be in [0, {process_count}), got {process_index}")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size: {global_batch_size} is not divisible by process_count "
                         f"{process_count}")
    local_batch = global_batch_size // process_count
    if settings.source == "precomputed":
        from lens_jax.data import precomputed

        return precomputed.make_train_dataset(settings, tokenizer, global_batch_size=global_batch_size, seed=seed,
                                              process_index=process_index, process_count=process_count, split=split)

    source = open_split(data_cfg, split)
    sizes = tfds_shapes.record_sizes(source, split)
    parts = bucket_slices(sizes, settings.buckets, settings.weights)
    if not parts:
        raise ValueError(f"data.buckets: no bucket with positive weight holds records "
                         f"(buckets {buckets_lib.format_sizes(settings.buckets)}, "
                         f"{len(sizes)} records)")

    datasets, weights = [], []
    for b, indices in parts:
        fn = RecordToExample(bucket=settings.buckets[b], epoch_len=len(indices), settings=settings,
                             tokenizer=tokenizer, seed=seed)
        datasets.append(bucket_batches(_Subset(source, indices), fn, seed=seed, bucket_id=b, local_batch=local_batch,
                                       process_index=process_index, process_count=process_count))
        weights.append(settings.weights[b])
    return mix_buckets(datasets, weights, settings)


def bucket_batches(source, fn, *, seed: int, bucket_id: int, local_batch: int, process_index: int,
                   process_count: int) -> grain.MapDataset:
    """One bucket's batches for this process: the ONE global order every reader (raw or precomputed) uses.

    Every process walks the same shuffled, repeated order and keeps its own rows of each global batch
    (local batch m = global batch k, rows of process p, with m = k * P + p): the global batch is the same
    for any process count, and each process reads and decodes only its rows.
    """
    bucket_seed = _mix64(seed, bucket_id, 0x5EED) & 0x7FFFFFFF
    return (grain.MapDataset.source(source)
            .shuffle(seed=bucket_seed)
            .repeat()
            .map_with_index(fn)
            .batch(local_batch, drop_remainder=True))[process_index::process_count]


def mix_buckets(datasets: Sequence[grain.MapDataset], weights: Sequence[float],
                settings: DataSettings) -> grain.IterDataset:
    """Buckets mixed deterministically by weight (every process picks the same bucket at a step), read ahead."""
    mixed = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(list(datasets), list(weights))
    threads = settings.worker_threads
    prefetch = settings.prefetch if threads > 0 else 0
    return mixed.to_iter_dataset(grain.ReadOptions(num_threads=threads if prefetch > 0 else 0,
                                                   prefetch_buffer_size=prefetch))


def make_eval_examples(data_cfg: Any, n: int, *, split: str | None = None) -> list[dict[str, Any]]:
    """The first ``n`` records of the eval split, for fixed sample prompts and evaluation.

    Each item: ``index``, ``dense_caption``, ``short_caption`` (str), ``ground_truth`` (dict or None),
    ``scene`` (:class:`shapes.Scene` rebuilt from the ground truth, or None), ``width``, ``height``,
    ``image`` (uint8 [H, W, 3], or None when unreadable).
    """
    settings = validate_data_config(data_cfg)
    if settings.source == "precomputed":  # the raw dataset the features were computed from
        from lens_jax.data import precomputed

        data_cfg = precomputed.source_data_config(settings.dir)
        settings = validate_data_config(data_cfg)
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    if settings.source == "shapes" and settings.num_eval <= 0:
        raise ValueError("data.num_eval: must be positive to take eval examples")
    if split is not None:
        source = open_split(data_cfg, split)
    else:
        try:
            source = open_split(data_cfg, "eval")
        except Exception:  # noqa: BLE001 - user TFDS datasets may call it 'validation'
            if settings.source == "shapes":
                raise
            source = open_split(data_cfg, "validation")
    if n > len(source):
        raise ValueError(f"data.num_eval: the eval split has {len(source)} records, {n} were asked for")
    out = []
    for i in range(n):
        rec = source[i]
        gt_text = _as_text(rec.get("ground_truth"))
        try:
            gt = json.loads(gt_text) if gt_text else None
        except ValueError:
            gt = None
        try:
            scene = shapes.scene_from_ground_truth(gt) if gt else None
        except (KeyError, TypeError, ValueError):
            scene = None
        out.append({
            "index": int(rec.get("index", i)),
            "dense_caption": _as_text(rec.get("dense_caption")),
            "short_caption": _as_text(rec.get("short_caption")),
            "ground_truth": gt,
            "scene": scene,
            "width": int(rec["width"]),
            "height": int(rec["height"]),
            "image": decode_image(rec.get("image")),
        })
    return out


def default_tokenizer():
    """The word-level tokenizer over the shapes vocabulary (convenience for configs and tests)."""
    return tokenizer_lib.build_word_tokenizer()


__all__ = [
    "CAPTION_MODES", "DataSettings", "RecordToExample", "bucket_slices", "caption_field", "dataset_dir", "decode_image",
    "default_data_config", "default_tokenizer", "make_eval_examples", "make_train_dataset", "open_split",
    "validate_data_config",
]
