"""The model kinds the converter knows: how each reads its config, lists its keys, builds its module.

A `Spec` is everything the generic importer / exporter needs about one model: its format (naming
scheme), its lens_jax config, the key table (`entries`), the MXFP4 storage of its logical tensors
(`pairs`, GPT-OSS only) and kind-specific extras kept in lens_jax.json.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping

from flax import nnx

import numpy as np

from lens_jax.convert import keys_flux2_vae, keys_gpt_oss, keys_lens_dit, mxfp4
from lens_jax.convert.common import ConvertError, Entry
from lens_jax.models.abstract import abstract_module


@dataclasses.dataclass
class Spec:
    kind: str
    fmt: str
    config: Any
    entries: list[Entry]
    pairs: dict[str, mxfp4.Pair] = dataclasses.field(default_factory=dict)
    extras: dict = dataclasses.field(default_factory=dict)
    dropped: tuple[str, ...] = ()  # keys accepted (optional) on import and not converted; values kept in extras
    constants: dict = dataclasses.field(default_factory=dict)  # key -> numpy value written on export

    @property
    def config_dict(self) -> dict:
        return self.config.to_dict()


def read_json(path: pathlib.Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None


class Kind:
    name: str
    subfolder: str  # in a released pipeline folder
    formats: tuple[str, ...]

    def prefer(self, fmt: str | None = None) -> tuple[str, ...]:
        raise NotImplementedError

    def file_base(self, fmt: str) -> str:
        return self.prefer(fmt)[0]

    def source_spec(self, folder: pathlib.Path, keys: list[str], config_json: dict | None, options: Mapping) -> Spec:
        raise NotImplementedError

    def spec_from_meta(self, meta: Mapping, fmt: str | None = None) -> Spec:
        raise NotImplementedError

    def abstract(self, spec: Spec):
        raise NotImplementedError

    def export_config(self, spec: Spec, meta: Mapping, dtype_name: str, mxfp4_experts: bool) -> dict:
        raise NotImplementedError

    def config_from_dict(self, d: Mapping, **overrides):
        raise NotImplementedError

    def build_abstract_from_meta(self, meta: Mapping, **overrides):
        spec = self.spec_from_meta(meta)
        if overrides:
            spec.config = self.config_from_dict({**spec.config.to_dict(), **overrides})
        return spec, self.abstract(spec)


# ----------------------------------------------------------------------------------------------


class LensDiTKind(Kind):
    name = "lens-dit"
    subfolder = "transformer"
    formats = ("official",)

    def prefer(self, fmt=None):
        return ("diffusion_pytorch_model", "model")

    def config_from_dict(self, d, **overrides):
        from lens_jax.models.dit import DiTConfig

        return DiTConfig.from_dict({**dict(d), **overrides})

    def source_spec(self, folder, keys, config_json, options):
        if config_json is None:
            raise ConvertError(f"lens-dit: {folder / 'config.json'} is missing (the official transformer/config.json)")
        cfg = keys_lens_dit.config_from_official(config_json)
        extras = {"selected_layer_index": [int(i) for i in config_json["selected_layer_index"]],
                  "patch_size": int(config_json.get("patch_size") or keys_lens_dit.DEFAULT_PATCH)}
        return Spec(self.name, "official", cfg, keys_lens_dit.entries(cfg), extras=extras)

    def spec_from_meta(self, meta, fmt=None):
        if fmt not in (None, "official"):
            raise ConvertError(f"lens-dit has one format, 'official' (got --format {fmt})")
        cfg = self.config_from_dict(meta["config"])
        return Spec(self.name, "official", cfg, keys_lens_dit.entries(cfg), extras=dict(meta.get("extras", {})))

    def abstract(self, spec):
        from lens_jax.models.dit import LensDiT

        return abstract_module(lambda: LensDiT(spec.config, rngs=nnx.Rngs(0)))

    def export_config(self, spec, meta, dtype_name, mxfp4_experts):
        if mxfp4_experts:
            raise ConvertError("--mxfp4 applies to gpt-oss experts only")
        base = (meta.get("source") or {}).get("config")
        return keys_lens_dit.official_config(spec.config, base, spec.extras.get("selected_layer_index"))


class GptOssKind(Kind):
    name = "gpt-oss"
    subfolder = "text_encoder"
    formats = keys_gpt_oss.FORMATS

    def prefer(self, fmt=None):
        return ("model",)

    def config_from_dict(self, d, **overrides):
        from lens_jax.models.gpt_oss import GptOssConfig

        return GptOssConfig.from_dict({**dict(d), **overrides})

    def source_spec(self, folder, keys, config_json, options):
        fmt = keys_gpt_oss.detect_format(keys)
        if config_json is None:
            raise ConvertError(f"gpt-oss: {folder / 'config.json'} is missing")
        overrides = {}
        if options.get("selected_layers"):
            overrides["selected_layers"] = tuple(int(i) for i in options["selected_layers"])
        cfg = keys_gpt_oss.config_from_json(config_json, "original" if keys_gpt_oss.is_original_config(config_json) else
                                            "transformers", **overrides)
        lm_head = keys_gpt_oss.has_lm_head(keys, fmt)
        return Spec(self.name, fmt, cfg, keys_gpt_oss.entries(cfg, fmt, lm_head), keys_gpt_oss.mxfp4_pairs(cfg, fmt),
                    extras={"include_lm_head": lm_head})

    def spec_from_meta(self, meta, fmt=None):
        cfg = self.config_from_dict(meta["config"])
        if fmt is None:
            fmt = (meta.get("source") or {}).get("format")
            fmt = fmt if fmt in self.formats else "transformers"
        if fmt not in self.formats:
            raise ConvertError(f"gpt-oss --format {fmt!r}; expected one of {self.formats}")
        extras = dict(meta.get("extras", {}))
        lm_head = bool(extras.get("include_lm_head", False))
        return Spec(self.name, fmt, cfg, keys_gpt_oss.entries(cfg, fmt, lm_head), keys_gpt_oss.mxfp4_pairs(cfg, fmt),
                    extras=extras)

    def abstract(self, spec):
        from lens_jax.models.gpt_oss import GptOssEncoder

        lm_head = bool(spec.extras.get("include_lm_head", False))
        return abstract_module(lambda: GptOssEncoder(spec.config, rngs=nnx.Rngs(0), include_lm_head=lm_head))

    def export_config(self, spec, meta, dtype_name, mxfp4_experts):
        source = meta.get("source") or {}
        base = source.get("config") if source.get("format") == spec.fmt else None
        if spec.fmt == "original":
            return keys_gpt_oss.original_config(spec.config, base)
        return keys_gpt_oss.hf_config(spec.config, base, dtype_name, mxfp4_experts)


class Flux2VaeKind(Kind):
    name = "flux2-vae"
    subfolder = "vae"
    formats = keys_flux2_vae.FORMATS

    def prefer(self, fmt=None):
        return ("ae",) if fmt == "bfl" else ("diffusion_pytorch_model", "ae")

    def config_from_dict(self, d, **overrides):
        from lens_jax.models.flux2_vae import Flux2VAEConfig

        return Flux2VAEConfig.from_dict({**dict(d), **overrides})

    def source_spec(self, folder, keys, config_json, options):
        fmt = keys_flux2_vae.detect_format(keys)
        if config_json is None and fmt == "diffusers":
            raise ConvertError(f"flux2-vae: {folder / 'config.json'} is missing")
        cfg = keys_flux2_vae.config_from_json(config_json, dtype="float32")
        return Spec(self.name, fmt, cfg, keys_flux2_vae.entries(cfg, fmt),
                    dropped=(keys_flux2_vae.NUM_BATCHES_TRACKED,))

    def spec_from_meta(self, meta, fmt=None):
        cfg = self.config_from_dict(meta["config"])
        if fmt is None:
            fmt = (meta.get("source") or {}).get("format")
            fmt = fmt if fmt in self.formats else "diffusers"
        if fmt not in self.formats:
            raise ConvertError(f"flux2-vae --format {fmt!r}; expected one of {self.formats}")
        extras = dict(meta.get("extras", {}))
        tracked = (extras.get("dropped") or {}).get(keys_flux2_vae.NUM_BATCHES_TRACKED, 0)
        return Spec(self.name, fmt, cfg, keys_flux2_vae.entries(cfg, fmt), extras=extras,
                    constants={keys_flux2_vae.NUM_BATCHES_TRACKED: np.asarray(tracked, np.int64)})

    def abstract(self, spec):
        from lens_jax.models.flux2_vae import abstract_flux2_vae

        return abstract_flux2_vae(spec.config)  # Params and the two batch-norm statistics

    def export_config(self, spec, meta, dtype_name, mxfp4_experts):
        if mxfp4_experts:
            raise ConvertError("--mxfp4 applies to gpt-oss experts only")
        if spec.fmt == "bfl":
            return None  # ae.safetensors comes without a config
        source = meta.get("source") or {}
        base = source.get("config") if source.get("format") == "diffusers" else None
        return keys_flux2_vae.diffusers_config(spec.config, base)

    def file_base(self, fmt):
        return "ae" if fmt == "bfl" else "diffusion_pytorch_model"


KINDS: dict[str, Kind] = {k.name: k for k in (LensDiTKind(), GptOssKind(), Flux2VaeKind())}


def get_kind(name: str) -> Kind:
    if name not in KINDS:
        raise ConvertError(f"unknown --kind {name!r}; expected one of {sorted(KINDS)}")
    return KINDS[name]
