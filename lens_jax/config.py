"""The run configuration: one ml_collections ConfigDict holds everything a run needs.

`base_config()` is the schema: every field a tool reads, with its default. Config files in
`configs/` start from it and change values; `validate(cfg)` rejects any field the schema does not
know (naming its full path), so a typo fails at once instead of being silently ignored.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

import ml_collections

from lens_jax.models.dit import DiTConfig

# Sub-dicts whose own dataclass validates them (they are free-form here).
_FREE_FORM = ("model", "text_encoder.model", "data.scene", "codec.vae")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "lens"
    c.seed = 0
    c.total_steps = 1000
    c.log_every = 10
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.sample_every = 0  # 0: only at the end
    c.init_from = ""  # an Orbax checkpoint dir (a workdir or a converted model) to initialise the DiT from

    c.model = DiTConfig().to_dict()

    c.text_encoder = ml_collections.ConfigDict()
    c.text_encoder.model = {}  # GptOssConfig fields
    c.text_encoder.weights = ""  # '' = seeded random weights (saved into the workdir); else an Orbax dir
    c.text_encoder.seed = 0
    c.text_encoder.tokenizer = ""  # '' = the built-in word tokenizer of the procedural dataset
    c.text_encoder.offset = 0  # leading tokens dropped from the features (the official pipeline drops 97)

    c.codec = ml_collections.ConfigDict()
    c.codec.kind = "pixel"  # 'pixel' (space-to-depth stand-in) or 'flux2'
    c.codec.patch = 8  # pixels per token side for 'pixel'
    c.codec.vae = {}  # Flux2VAEConfig fields for 'flux2' ({} = the real FLUX.2 VAE)
    c.codec.weights = ""  # 'flux2': a converted flux2-vae dir; '' = seeded random (saved into the workdir)
    c.codec.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "shapes"
    c.data.dir = ""
    c.data.name = ""
    # source='tfds' on a dataset that is not ours: its feature names ('' = detected: image, caption, ...)
    c.data.image_key = ""
    c.data.caption_key = ""
    c.data.short_caption_key = ""
    c.data.num_train = 20000
    c.data.num_eval = 256
    c.data.dataset_seed = 0  # seed of the procedural scenes (independent of the training seed)
    c.data.scene = {}  # ShapesConfig overrides for the procedural scenes (lens_jax/data/shapes.py)
    c.data.render_sizes = "64x64"
    c.data.buckets = "64x64"
    c.data.bucket_weights = "1"
    c.data.caption = "dense"
    c.data.dense_ratio = 0.5
    c.data.max_text_len = 128
    c.data.global_batch_size = 32
    c.data.worker_threads = 2
    c.data.prefetch = 2

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 2e-4
    c.optimizer.schedule = "constant"  # 'constant' or 'cosine' (after warmup)
    c.optimizer.warmup_steps = 0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip = 1.0
    c.optimizer.grad_accum_steps = 1
    c.optimizer.ema_decay = 0.0  # 0 disables EMA
    c.optimizer.ema_warmup = 0.0  # > 0: decay capped at (1 + step) / (ema_warmup + step) (10 is usual); 0: off

    c.loss = ml_collections.ConfigDict()
    c.loss.text_dropout = 0.1
    c.loss.sigma_std = 1.0
    c.loss.mu_at_low = 1.0  # logit-normal mean at `low_tokens` image tokens ...
    c.loss.mu_at_high = 1.3  # ... and at `high_tokens`, linear in between, clamped outside
    c.loss.low_tokens = 256
    c.loss.high_tokens = 4096

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.sample = ml_collections.ConfigDict()
    c.sample.prompts = ""  # '|'-separated; '' = captions of the first eval scenes
    c.sample.num_prompts = 8
    c.sample.steps = 20
    c.sample.guidance = 5.0
    c.sample.width = 0  # 0 = the first bucket
    c.sample.height = 0

    c.hardware = ml_collections.ConfigDict()
    c.hardware.peak_flops = 0.0  # per device; 0 = look up from the device kind (SPEC section 7)
    return c


def _walk(base: Any, cfg: Any, path: str, errors: list[str]):
    if path.lstrip(".") in _FREE_FORM:
        return
    if isinstance(cfg, (ml_collections.ConfigDict, dict)):
        base_keys = set(base.keys()) if isinstance(base, (ml_collections.ConfigDict, dict)) else set()
        for k in cfg.keys():
            p = f"{path}.{k}"
            if k not in base_keys:
                errors.append(p.lstrip("."))
            else:
                _walk(base[k], cfg[k], p, errors)


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Reject unknown fields and inconsistent sizes, naming the field."""
    errors: list[str] = []
    _walk(base_config(), cfg, "", errors)
    if errors:
        raise ValueError(f"unknown config field(s): {', '.join('config.' + e for e in errors)}")
    DiTConfig.from_dict(cfg.model)  # raises naming unknown model fields
    for name in ("total_steps", "log_every", "checkpoint_every"):
        if int(cfg[name]) <= 0:
            raise ValueError(f"config.{name} must be positive, got {cfg[name]}")
    if cfg.data.global_batch_size % cfg.optimizer.grad_accum_steps:
        raise ValueError(
            f"config.data.global_batch_size={cfg.data.global_batch_size} is not divisible by "
            f"config.optimizer.grad_accum_steps={cfg.optimizer.grad_accum_steps}"
        )
    return cfg


def load_python_file(path: str | pathlib.Path, kind: str = "config"):
    """Import a Python file by path (config and schedule files are Python, not a package's modules)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{kind} file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"lens_{kind}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_from_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The `get_config()` of a config file (configs can build on each other with this)."""
    return load_python_file(path, "config").get_config()


def load_config(path: str | pathlib.Path, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """Load `configs/NAME.py` (its get_config()), apply dotted overrides, validate."""
    cfg = config_from_file(path)
    for key, value in (overrides or {}).items():
        set_field(cfg, key, value)
    return validate(cfg)


def parse_value(value: str) -> Any:
    """A command-line override value: int, float, true/false, else the string."""
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def parse_overrides(items) -> dict[str, Any]:
    """['model.dtype=float32', ...] (repeatable --set flags) -> {'model.dtype': 'float32', ...}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        out[key.strip()] = parse_value(value)
    return out


def set_field(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = cfg
    for p in parts[:-1]:
        if p not in node:
            raise ValueError(f"unknown config field config.{dotted}")
        node = node[p]
    if parts[-1] not in node and ".".join(parts[:-1]) not in _FREE_FORM:
        raise ValueError(f"unknown config field config.{dotted}")
    node[parts[-1]] = value
