"""Training schedules for the compute-budget calculator: stages of steps x batch over a bucket mix.

A schedule is a Python file whose `get_schedule()` returns a mapping (a dict or an ml_collections
ConfigDict) with these fields; `load_schedule(path)` validates it and every error names the file
and the field (`configs/schedules/x.py: stages[1].per_device_batch: ...`):

    name                 str
    description          str (optional)
    defaults             mapping of stage fields shared by every stage (optional)
    stages               list of mappings, each with:
      name               str
      steps              int > 0, optimizer steps of the stage
      buckets            "WxH,WxH,..." or a list of "WxH" strings (pixel sizes)
      bucket_weights     (optional) one weight per bucket, default uniform: the share of the stage's
                         (step, device) slots that draw that bucket. With a global batch this is the
                         share of steps; with per-device batches by area each device slot draws a
                         bucket and takes that area's batch (the same expectation as one bucket per
                         step for all devices)
      global_batch       int, samples per step whatever the bucket (devices, if given, only sets
                         the wall-clock time reported); or
      devices            int, with
      per_device_batch   int, or a mapping area side -> batch ({"512": 24, "768": 10, "1024": 6});
                         a bucket takes the entry whose side^2 is nearest its area (within 25%)
      caption_tokens     mean caption length in the text encoder's tokens (the user message alone)
      template_tokens    (default 0) chat-template tokens after the caption that also reach the DiT
      text_offset        (default: the run config's text_encoder.offset) leading template tokens the
                         encoder reads and the DiT does not (the official pipeline drops 97)
      text_pad_to        (default 0) 0: sequences cost their mean length (pad to the longest of a
                         small batch, as the PyTorch pipeline does, ~ the mean); N: every sequence is
                         padded to N tokens including the offset (a static-shape JAX loop pads to
                         data.max_text_len)
      max_text_len       (default: the run config's data.max_text_len) truncation including the offset
      precomputed_text   (default False) text features cached offline: no encoder FLOPs in training
      precomputed_latents (default False) VAE latents cached offline: no VAE-encode FLOPs in training
      notes              str (optional, free text)
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Mapping, Sequence

# The paper's stage 2 (SPEC section 5): 9 aspect ratios from 1:2 to 2:1, written width:height. The same
# nine as the released pipeline's inference buckets (1:2, 9:16, 2:3, 3:4, 1:1 and their transposes).
PAPER_RATIOS = ("1:2", "9:16", "2:3", "3:4", "1:1", "4:3", "3:2", "16:9", "2:1")

_STAGE_FIELDS = {
    "name", "steps", "buckets", "bucket_weights", "global_batch", "devices", "per_device_batch",
    "caption_tokens", "template_tokens", "text_offset", "text_pad_to", "max_text_len",
    "precomputed_text", "precomputed_latents", "notes",
}
_TOP_FIELDS = {"name", "description", "defaults", "stages"}


class ScheduleError(ValueError):
    """A schedule file is malformed; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Bucket:
    width: int
    height: int
    weight: float  # normalised over the stage's buckets

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}"

    def image_tokens(self, px_per_token: int = 16) -> int:
        return (self.width // px_per_token) * (self.height // px_per_token)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    steps: int
    buckets: tuple[Bucket, ...]
    global_batch: int = 0
    devices: int = 0
    per_device_batch: tuple[tuple[int, int], ...] = ()  # (area side, batch); (0, b) = b for every bucket
    caption_tokens: float = 0.0
    template_tokens: int = 0
    text_offset: int | None = None
    text_pad_to: int = 0
    max_text_len: int | None = None
    precomputed_text: bool = False
    precomputed_latents: bool = False
    notes: str = ""

    def batch_for(self, bucket: Bucket) -> int:
        """Samples per step when the whole step is this bucket (global, or devices x per-device)."""
        if self.global_batch:
            return self.global_batch
        return self.devices * _per_device_lookup(self.per_device_batch, bucket)

    def samples_by_bucket(self) -> list[tuple[Bucket, float]]:
        """Expected training samples of each bucket over the stage: steps x weight x batch."""
        return [(b, self.steps * b.weight * self.batch_for(b)) for b in self.buckets]

    @property
    def samples(self) -> float:
        return sum(n for _, n in self.samples_by_bucket())

    @property
    def mean_global_batch(self) -> float:
        return self.samples / self.steps

    def text_lengths(self, default_offset: int, default_max_len: int) -> tuple[float, float]:
        """(DiT text tokens, encoder tokens) per sample: mean caption + template tokens after the
        offset, or the padded length; truncated at max_text_len including the offset."""
        offset = default_offset if self.text_offset is None else self.text_offset
        max_len = default_max_len if self.max_text_len is None else self.max_text_len
        encoder = float(self.text_pad_to) if self.text_pad_to else offset + self.caption_tokens + self.template_tokens
        encoder = min(encoder, float(max_len))
        return max(encoder - offset, 0.0), encoder


@dataclasses.dataclass(frozen=True)
class Schedule:
    name: str
    stages: tuple[Stage, ...]
    description: str = ""
    source: str = ""

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.stages)


def _per_device_lookup(table: tuple[tuple[int, int], ...], bucket: Bucket) -> int:
    if len(table) == 1 and table[0][0] == 0:
        return table[0][1]
    side, batch = min(table, key=lambda kv: abs(math.log(bucket.width * bucket.height / kv[0] ** 2)))
    return batch


def ratio_value(ratio: str | float) -> float:
    if isinstance(ratio, str):
        w, _, h = ratio.partition(":")
        return float(w) / float(h)
    return float(ratio)


def aspect_buckets(area_side: int, ratios: Sequence[str | float] = PAPER_RATIOS, multiple: int = 16) -> list[str]:
    """Sizes of about `area_side`^2 pixels at each width:height ratio r: width = side * sqrt(r),
    height = side / sqrt(r), each rounded to the nearest multiple of `multiple` (16 px = one token)."""
    out = []
    for r in ratios:
        r = ratio_value(r)
        w = max(multiple, int(round(area_side * math.sqrt(r) / multiple)) * multiple)
        h = max(multiple, int(round(area_side / math.sqrt(r) / multiple)) * multiple)
        out.append(f"{w}x{h}")
    return out


# ------------------------------------------------------------------------------------------------
# Loading and validation
# ------------------------------------------------------------------------------------------------


def _plain(x: Any) -> Any:
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _int(src: str, field: str, v: Any, *, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
        raise ScheduleError(f"{src}: {field}: expected an integer, got {v!r}")
    if int(v) < minimum:
        raise ScheduleError(f"{src}: {field}: must be >= {minimum}, got {v!r}")
    return int(v)


def _parse_size(src: str, field: str, s: Any) -> tuple[int, int]:
    try:
        w, h = (int(t) for t in str(s).lower().strip().split("x"))
    except ValueError:
        raise ScheduleError(f"{src}: {field}: {s!r} is not a WxH size") from None
    if w <= 0 or h <= 0:
        raise ScheduleError(f"{src}: {field}: {s!r} has a non-positive side")
    return w, h


def _parse_stage(src: str, where: str, raw: Mapping[str, Any], defaults: Mapping[str, Any], px_per_token: int) -> Stage:
    d = {**defaults, **raw}
    unknown = sorted(set(d) - _STAGE_FIELDS)
    if unknown:
        raise ScheduleError(f"{src}: {where}.{unknown[0]}: unknown field; known: {', '.join(sorted(_STAGE_FIELDS))}")
    for req in ("name", "steps", "buckets", "caption_tokens"):
        if req not in d:
            raise ScheduleError(f"{src}: {where}.{req}: missing required field")
    name = str(d["name"])
    steps = _int(src, f"{where}.steps", d["steps"], minimum=1)

    sizes_raw = d["buckets"]
    sizes_list = [t for t in sizes_raw.split(",") if t.strip()] if isinstance(sizes_raw, str) else list(sizes_raw)
    if not sizes_list:
        raise ScheduleError(f"{src}: {where}.buckets: empty")
    sizes = [_parse_size(src, f"{where}.buckets[{i}]", s) for i, s in enumerate(sizes_list)]
    for i, (w, h) in enumerate(sizes):
        if w % px_per_token or h % px_per_token:
            raise ScheduleError(f"{src}: {where}.buckets[{i}]: {w}x{h} is not a multiple of {px_per_token} px "
                                f"(one token) on both sides")
    weights_raw = d.get("bucket_weights")
    if weights_raw is None or weights_raw == "":
        weights = [1.0] * len(sizes)
    else:
        items = weights_raw.split(",") if isinstance(weights_raw, str) else list(weights_raw)
        try:
            weights = [float(x) for x in items]
        except (TypeError, ValueError):
            raise ScheduleError(f"{src}: {where}.bucket_weights: {weights_raw!r} are not numbers") from None
        if len(weights) != len(sizes):
            raise ScheduleError(f"{src}: {where}.bucket_weights: {len(weights)} weights for {len(sizes)} buckets")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ScheduleError(f"{src}: {where}.bucket_weights: weights must be >= 0 with a positive sum")
    total_w = sum(weights)
    buckets = tuple(Bucket(w, h, wt / total_w) for (w, h), wt in zip(sizes, weights))

    global_batch = d.get("global_batch", 0) or 0
    devices = d.get("devices", 0) or 0
    pdb = d.get("per_device_batch")
    if global_batch and pdb is not None:
        raise ScheduleError(f"{src}: {where}.global_batch: give either global_batch or devices + per_device_batch, not both")
    table: tuple[tuple[int, int], ...] = ()
    if global_batch:
        global_batch = _int(src, f"{where}.global_batch", global_batch, minimum=1)
        devices = _int(src, f"{where}.devices", devices) if devices else 0  # optional: wall-clock only
    else:
        if pdb is None:
            raise ScheduleError(f"{src}: {where}.global_batch: missing (or give devices + per_device_batch)")
        devices = _int(src, f"{where}.devices", devices, minimum=1)
        if isinstance(pdb, Mapping):
            if not pdb:
                raise ScheduleError(f"{src}: {where}.per_device_batch: empty mapping")
            table = tuple(sorted((_int(src, f"{where}.per_device_batch (key {k!r})", int(k) if str(k).isdigit() else k, minimum=1),
                                  _int(src, f"{where}.per_device_batch[{k!r}]", v, minimum=1)) for k, v in pdb.items()))
            for i, b in enumerate(buckets):
                side = min(table, key=lambda kv: abs(math.log(b.width * b.height / kv[0] ** 2)))[0]
                if not 0.8 <= b.width * b.height / side ** 2 <= 1.25:
                    raise ScheduleError(f"{src}: {where}.per_device_batch: bucket {b.label} (buckets[{i}]) is not within "
                                        f"25% of any area in {dict(table)}")
        else:
            table = ((0, _int(src, f"{where}.per_device_batch", pdb, minimum=1)),)

    caption = d["caption_tokens"]
    if isinstance(caption, bool) or not isinstance(caption, (int, float)) or caption < 0:
        raise ScheduleError(f"{src}: {where}.caption_tokens: expected a number >= 0, got {caption!r}")
    opt_int = {}
    for key in ("text_offset", "max_text_len"):
        opt_int[key] = None if d.get(key) is None else _int(src, f"{where}.{key}", d[key])
    for key in ("precomputed_text", "precomputed_latents"):
        if not isinstance(d.get(key, False), bool):
            raise ScheduleError(f"{src}: {where}.{key}: expected True or False, got {d[key]!r}")
    return Stage(
        name=name, steps=steps, buckets=buckets, global_batch=global_batch, devices=int(devices),
        per_device_batch=table, caption_tokens=float(caption),
        template_tokens=_int(src, f"{where}.template_tokens", d.get("template_tokens", 0)),
        text_offset=opt_int["text_offset"],
        text_pad_to=_int(src, f"{where}.text_pad_to", d.get("text_pad_to", 0)),
        max_text_len=opt_int["max_text_len"],
        precomputed_text=bool(d.get("precomputed_text", False)),
        precomputed_latents=bool(d.get("precomputed_latents", False)),
        notes=str(d.get("notes", "")),
    )


def parse_schedule(raw: Any, source: str = "<schedule>", px_per_token: int = 16) -> Schedule:
    """Validate a get_schedule() mapping; every error names `source` and the field."""
    raw = _plain(raw)
    if not isinstance(raw, Mapping):
        raise ScheduleError(f"{source}: get_schedule() must return a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _TOP_FIELDS)
    if unknown:
        raise ScheduleError(f"{source}: {unknown[0]}: unknown field; known: {', '.join(sorted(_TOP_FIELDS))}")
    stages_raw = raw.get("stages")
    if not stages_raw:
        raise ScheduleError(f"{source}: stages: missing or empty")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise ScheduleError(f"{source}: defaults: expected a mapping of stage fields")
    bad = sorted(set(defaults) - _STAGE_FIELDS)
    if bad:
        raise ScheduleError(f"{source}: defaults.{bad[0]}: unknown field; known: {', '.join(sorted(_STAGE_FIELDS))}")
    stages = []
    for i, st in enumerate(stages_raw):
        if not isinstance(st, Mapping):
            raise ScheduleError(f"{source}: stages[{i}]: expected a mapping, got {type(st).__name__}")
        stages.append(_parse_stage(source, f"stages[{i}]", st, defaults, px_per_token))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ScheduleError(f"{source}: stages[].name: stage names must be unique, got {names}")
    return Schedule(name=str(raw.get("name", pathlib.Path(source).stem)), stages=tuple(stages),
                    description=str(raw.get("description", "")), source=source)


def load_schedule(path: str | pathlib.Path, px_per_token: int = 16) -> Schedule:
    """Run a schedule file's get_schedule() and validate it."""
    from lens_jax.config import load_python_file

    path = pathlib.Path(path)
    module = load_python_file(path, "schedule")
    if not hasattr(module, "get_schedule"):
        raise ScheduleError(f"{path}: no get_schedule() function")
    return parse_schedule(module.get_schedule(), source=str(path), px_per_token=px_per_token)
