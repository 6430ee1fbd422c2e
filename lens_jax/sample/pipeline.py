"""Text-to-image inference: prompts -> uint8 images, in three separately jitted stages.

    encode_prompts  (tokenizer + frozen text encoder, lens_jax.text.features.text_features)
    denoise         (lens_jax.sample.euler.euler_sample: the whole Euler loop as one compiled program;
                     CFG as one batch [cond; uncond], no uncond pass at guidance 1)
    decode          (the codec: pixels, or the FLUX.2 VAE)

`LensPipeline.from_dir(path)` accepts two folder layouts:

1. A training workdir (written by `python -m lens_jax.train --workdir DIR`):

       DIR/config.json            the run's config (model, text_encoder, codec, data.max_text_len, ...)
       DIR/tokenizer/             the run's tokenizer (save_pretrained)
       DIR/text_encoder/          the frozen encoder, a converted gpt-oss dir (or config.text_encoder.weights)
       DIR/vae/                   (codec 'flux2' only) the VAE, a converted flux2-vae dir (or config.codec.weights)
       DIR/checkpoints/<step>/    Orbax steps; the latest one's `state` gives `ema` (when the run kept an
                                  EMA and use_ema=True) or `params`

   The text offset and the maximum text length are the run's (config.text_encoder.offset,
   config.data.max_text_len); the default size is config.sample.width/height, else the first bucket.

2. A converted pipeline folder (the released Lens weights, converted once):

       DIR/transformer/           converted lens-dit   (lens_jax.json + checkpoints/0)
       DIR/text_encoder/          converted gpt-oss
       DIR/vae/                   converted flux2-vae
       DIR/tokenizer/             the released tokenizer folder (tokenizer.json + chat template), copied as is
       DIR/lens_jax_pipeline.json (optional) {"offset": 97, "max_text_len": 512, "width": 1024, "height": 1024}

   Build it from the released pipeline folder REL (the Hugging Face snapshot, with transformer/,
   text_encoder/, vae/ and tokenizer/ subfolders):

       python -m lens_jax.convert import --kind lens-dit  --src REL --dst DIR/transformer
       python -m lens_jax.convert import --kind gpt-oss   --src REL --dst DIR/text_encoder
       python -m lens_jax.convert import --kind flux2-vae --src REL --dst DIR/vae
       cp -r REL/tokenizer DIR/tokenizer

   Defaults: offset 97 (DEFAULT_TXT_OFFSET), 512 text tokens, 1024x1024.

Determinism: image j (0 <= j < num_images) of *every* prompt starts from the noise of
fold_in(key(seed), j), drawn alone as tokens [1, h*w, C]; so a batch of K prompts gives the images
of K single-prompt runs with the same seed, and one seed always gives the same images.

Sharding: the weights are placed by the partitioning rules on `mesh` (default: every device on
'data'); a batch is split over the mesh's data axes (data x fsdp) when its size divides over them,
and replicated otherwise.
"""

from __future__ import annotations

import json
import pathlib
import time
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lens_jax.sample.euler import euler_sample, initial_noise
from lens_jax.sample.presets import DEFAULT_PRESET, get_preset
from lens_jax.sample.schedule import sigma_schedule
from lens_jax.text import prompt as prompt_lib
from lens_jax.text.features import text_features

MIN_SIZE, MAX_SIZE = 256, 2048
PIPELINE_JSON = "lens_jax_pipeline.json"


# ---------------------------------------------------------------------------------------- sizes


def size_multiple(codec) -> int:
    """Pixels per token side: 16 for FLUX.2 latents (8x VAE, 2x2 patches), the patch for the pixel codec."""
    return int(codec.downsample)


def valid_size_range(codec, allow_small: bool = False) -> tuple[int, int, int]:
    """(multiple, smallest, largest) allowed side. Sizes below 256 are allowed for the pixel codec
    (the tiny demo models work at 32x32) or when `allow_small`."""
    m = size_multiple(codec)
    small = allow_small or getattr(codec, "kind", "") == "pixel"
    lo = m if small else ((MIN_SIZE + m - 1) // m) * m
    hi = (MAX_SIZE // m) * m
    return m, lo, hi


def nearest_valid(value: int, multiple: int, lo: int, hi: int) -> int:
    return int(min(max(((2 * int(value) + multiple) // (2 * multiple)) * multiple, lo), hi))  # ties round up


def check_size(width: int, height: int, codec, allow_small: bool = False) -> None:
    """Raises ValueError naming the nearest valid size when width x height is not allowed."""
    m, lo, hi = valid_size_range(codec, allow_small)
    bad = [(n, v) for n, v in (("width", width), ("height", height)) if v % m or not lo <= v <= hi]
    if bad:
        nw, nh = nearest_valid(width, m, lo, hi), nearest_valid(height, m, lo, hi)
        why = "; ".join(f"{n} {v}" for n, v in bad)
        hint = "" if lo < MIN_SIZE else " (sizes below 256 need the pixel codec or --allow-small)"
        raise ValueError(f"invalid image size {width}x{height} ({why}): sides must be multiples of {m} between "
                         f"{lo} and {hi}{hint}; nearest valid size: {nw}x{nh}")


# ---------------------------------------------------------------------------------------- jitted stages


_encode_jit = jax.jit(text_features, static_argnums=(0, 4))
_decode_jit = jax.jit(lambda codec, latents: codec.decode(latents))


def _default_mesh():
    from lens_jax.parallel.mesh import make_mesh

    return make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


class LensPipeline:
    """Holds the DiT (graphdef + params), the text encoder (graphdef + params), the tokenizer, the codec,
    the text offset and the maximum text length."""

    def __init__(self, dit_graphdef, dit_params, enc_graphdef, enc_params, tokenizer, codec, *, offset: int = 0,
                 max_text_len: int = prompt_lib.DEFAULT_MAX_LENGTH, mesh=None, default_size=(1024, 1024),
                 source: str = ""):
        self.dit_graphdef, self.dit_params = dit_graphdef, dit_params
        self.enc_graphdef, self.enc_params = enc_graphdef, enc_params
        self.tokenizer, self.codec = tokenizer, codec
        self.offset, self.max_text_len = int(offset), int(max_text_len)
        self.mesh = _default_mesh() if mesh is None else mesh
        self.default_size = tuple(int(v) for v in default_size)
        self.source = source
        self.timings: dict[str, float] = {}
        self._offset_checked = False

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dir(cls, path, mesh=None, use_ema: bool = True, *, offset: int | None = None,
                 max_text_len: int | None = None, step: int | None = None) -> "LensPipeline":
        """A training workdir (config.json + checkpoints/) or a converted pipeline folder (transformer/,
        text_encoder/, vae/, tokenizer/); see the module docstring for both layouts. `step` picks a
        workdir checkpoint (default: the latest)."""
        path = pathlib.Path(path).absolute()
        if not path.is_dir():
            raise FileNotFoundError(f"--weights {path}: no such directory")
        mesh = _default_mesh() if mesh is None else mesh
        if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
            return cls._from_workdir(path, mesh, use_ema, offset, max_text_len, step)
        if step is not None:
            raise ValueError(f"step={step}: only a training workdir has numbered checkpoints, {path} is not one")
        if (path / "transformer").is_dir():
            return cls._from_converted(path, mesh, offset, max_text_len)
        raise ValueError(f"{path} is neither a training workdir (config.json + checkpoints/) nor a converted "
                         f"pipeline folder (transformer/, text_encoder/, vae/, tokenizer/)")

    @classmethod
    def _from_workdir(cls, path: pathlib.Path, mesh, use_ema, offset, max_text_len, step=None):
        from lens_jax.data import tokenizer as tokenizer_lib
        from lens_jax.models.dit import DiTConfig
        from lens_jax.parallel.placement import state_shardings
        from lens_jax.text.encoder import load_text_encoder
        from lens_jax.train.frozen import load_codec
        from lens_jax.train.state import abstract_dit

        cfg = ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
        with jax.set_mesh(mesh):
            tok_dir = path / "tokenizer"
            if tok_dir.is_dir():
                tok = tokenizer_lib.load_tokenizer(tok_dir)
            elif cfg.text_encoder.tokenizer:
                tok = tokenizer_lib.load_tokenizer(cfg.text_encoder.tokenizer)
            else:
                tok = tokenizer_lib.build_word_tokenizer()
            codec = load_codec(cfg.codec, mesh, path / "vae")
            enc_graphdef, enc_params, _ = load_text_encoder(cfg.text_encoder, mesh, path / "text_encoder")
            dit_graphdef, abstract = abstract_dit(DiTConfig.from_dict(cfg.model))
            shardings = state_shardings(abstract, mesh)
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
            tree = "ema" if use_ema and float(cfg.optimizer.ema_decay) > 0 else "params"
            params = _restore_tree(path / "checkpoints", target, tree, step)
        width = int(cfg.sample.width) or int(cfg.data.buckets.split(",")[0].lower().split("x")[0])
        height = int(cfg.sample.height) or int(cfg.data.buckets.split(",")[0].lower().split("x")[1])
        return cls(dit_graphdef, params, enc_graphdef, enc_params, tok, codec,
                   offset=int(cfg.text_encoder.offset) if offset is None else offset,
                   max_text_len=int(cfg.data.max_text_len) if max_text_len is None else max_text_len,
                   mesh=mesh, default_size=(width, height),
                   source=f"{path} ({tree}{'' if step is None else f', step {step}'})")

    @classmethod
    def _from_converted(cls, path: pathlib.Path, mesh, offset, max_text_len):
        from lens_jax.convert.checkpoint_io import load_converted, read_meta
        from lens_jax.data import tokenizer as tokenizer_lib
        from lens_jax.models.codec import make_codec
        from lens_jax.parallel.placement import replicated

        for sub in ("transformer", "text_encoder", "vae", "tokenizer"):
            if not (path / sub).is_dir():
                raise FileNotFoundError(f"converted pipeline folder {path}: {sub}/ is missing")
        extra = json.loads((path / PIPELINE_JSON).read_text()) if (path / PIPELINE_JSON).is_file() else {}
        with jax.set_mesh(mesh):
            for sub, kind in (("transformer", "lens-dit"), ("text_encoder", "gpt-oss"), ("vae", "flux2-vae")):
                got = read_meta(path / sub).get("kind")
                if got != kind:
                    raise ValueError(f"{path / sub} holds a converted {got!r}, expected {kind!r}")
            want_layers = read_meta(path / "transformer").get("extras", {}).get("selected_layer_index")
            enc_layers = read_meta(path / "text_encoder")["config"].get("selected_layers")
            if want_layers is not None and enc_layers is not None and list(want_layers) != list(enc_layers):
                raise ValueError(f"{path / 'text_encoder'} returns layers {list(enc_layers)} but the DiT reads "
                                 f"selected_layer_index {list(want_layers)}: re-import the encoder with "
                                 f"--selected-layers {','.join(map(str, want_layers))} (or --src the whole pipeline folder)")
            _, dit_graphdef, dit_params = load_converted(path / "transformer", mesh)
            _, enc_graphdef, enc_params = load_converted(path / "text_encoder", mesh)
            vae_meta = read_meta(path / "vae")
            _, _, vae_state = load_converted(path / "vae", mesh)
            vae_state = jax.device_put(vae_state, replicated(mesh))
            codec = make_codec(ml_collections.ConfigDict({"kind": "flux2", "vae": dict(vae_meta["config"])}),
                               vae_state=vae_state)
        tok = tokenizer_lib.load_tokenizer(path / "tokenizer")
        return cls(dit_graphdef, dit_params, enc_graphdef, enc_params, tok, codec,
                   offset=int(extra.get("offset", prompt_lib.DEFAULT_TXT_OFFSET)) if offset is None else offset,
                   max_text_len=int(extra.get("max_text_len", prompt_lib.DEFAULT_MAX_LENGTH))
                   if max_text_len is None else max_text_len,
                   mesh=mesh, default_size=(int(extra.get("width", 1024)), int(extra.get("height", 1024))),
                   source=str(path))

    # ------------------------------------------------------------------ placement

    def _sharding(self, shape):
        from lens_jax.parallel.mesh import data_parallel_size
        from lens_jax.parallel.placement import batch_sharding, replicated

        if shape and shape[0] % data_parallel_size(self.mesh) == 0:
            return batch_sharding(self.mesh, len(shape))
        return replicated(self.mesh)

    def _put(self, x):
        x = np.asarray(x)
        sh = self._sharding(x.shape)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    # ------------------------------------------------------------------ stages

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if not self._offset_checked:
            prompt_lib.check_offset(self.tokenizer, self.offset)
            self._offset_checked = True
        return prompt_lib.tokenize_prompts(self.tokenizer, list(prompts), self.max_text_len)

    def encode_ids(self, ids, mask):
        """Token ids [B, T] -> (features [B, T - offset, L, D], mask [B, T - offset]) (jitted)."""
        with jax.set_mesh(self.mesh):
            return _encode_jit(self.enc_graphdef, self.enc_params, self._put(ids), self._put(mask), self.offset)

    def encode_prompts(self, prompts: Sequence[str]):
        return self.encode_ids(*self.tokenize(prompts))

    def negative_features(self, negative_prompt: str, hidden, mask):
        """(cond hidden, cond mask, uncond hidden, uncond mask), the two zero-padded to one length.
        An empty (or blank) negative is zero features with an all-false mask, of the prompt's length."""
        b = hidden.shape[0]
        if not (negative_prompt or "").strip():
            return hidden, mask, jnp.zeros_like(hidden), jnp.zeros_like(mask)
        nh, nm = self.encode_prompts([negative_prompt])
        nh = jnp.broadcast_to(nh, (b,) + nh.shape[1:])
        nm = jnp.broadcast_to(nm, (b,) + nm.shape[1:])
        t = max(hidden.shape[1], nh.shape[1])
        pad = lambda x, m: (jnp.pad(x, [(0, 0), (0, t - x.shape[1]), (0, 0), (0, 0)]),
                            jnp.pad(m, [(0, 0), (0, t - m.shape[1])]))
        hidden, mask = pad(hidden, mask)
        nh, nm = pad(nh.astype(hidden.dtype), nm)
        return hidden, mask, nh, nm

    def noise(self, seed: int, num_prompts: int, num_images: int, width: int, height: int) -> np.ndarray:
        """[num_prompts * num_images, h, w, C]: image j of every prompt from fold_in(key(seed), j)."""
        h, w = height // self.codec.downsample, width // self.codec.downsample
        base = jax.random.key(int(seed))
        per = [np.asarray(initial_noise(jax.random.fold_in(base, j), 1, h, w, self.codec.channels))[0]
               for j in range(num_images)]
        return np.stack([per[j] for _ in range(num_prompts) for j in range(num_images)])

    def sigmas(self, steps: int, width: int, height: int) -> np.ndarray:
        h, w = height // self.codec.downsample, width // self.codec.downsample
        return np.asarray(sigma_schedule(int(steps), h * w), np.float32)

    def denoise(self, noise, sigmas, hidden, mask, neg_hidden, neg_mask, guidance: float):
        """The Euler loop (jitted, one program); guidance 1 runs no uncond pass."""
        use_cfg = float(guidance) != 1.0
        with jax.set_mesh(self.mesh):
            return euler_sample(self.dit_graphdef, self.dit_params, self._put(noise), jnp.asarray(sigmas, jnp.float32),
                                hidden, mask, neg_hidden, neg_mask, jnp.float32(guidance), use_cfg=use_cfg)

    def decode(self, latents) -> np.ndarray:
        from jax.experimental import multihost_utils

        with jax.set_mesh(self.mesh):
            images = _decode_jit(self.codec, latents)
        if jax.process_count() > 1:
            return np.asarray(multihost_utils.process_allgather(images, tiled=True))
        return np.asarray(images)

    # ------------------------------------------------------------------ all together

    def generate(self, prompts: Sequence[str] | str, negative_prompt: str = "", width: int | None = None,
                 height: int | None = None, steps: int | None = None, guidance: float | None = None, seed: int = 0,
                 num_images: int = 1, preset: str = DEFAULT_PRESET, allow_small: bool = False) -> np.ndarray:
        """uint8 images [len(prompts) * num_images, height, width, 3], prompt-major. Steps and guidance
        default to the preset's (lens 20 / 5.0, turbo 4 / 1.0, base 50 / 5.0)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        p = get_preset(preset)
        steps = p.steps if steps is None else int(steps)
        guidance = p.guidance if guidance is None else float(guidance)
        width = self.default_size[0] if width is None else int(width)
        height = self.default_size[1] if height is None else int(height)
        check_size(width, height, self.codec, allow_small)

        t0 = time.perf_counter()
        rows = [q for q in prompts for _ in range(num_images)]
        hidden, mask = self.encode_prompts(rows)
        if guidance != 1.0:
            hidden, mask, nh, nm = self.negative_features(negative_prompt, hidden, mask)
        else:
            if (negative_prompt or "").strip():
                warnings.warn("guidance 1 runs no unconditional pass: the negative prompt is ignored", stacklevel=2)
            nh, nm = jnp.zeros_like(hidden), jnp.zeros_like(mask)
        jax.block_until_ready((hidden, nh))
        t1 = time.perf_counter()
        latents = self.denoise(self.noise(seed, len(prompts), num_images, width, height),
                               self.sigmas(steps, width, height), hidden, mask, nh, nm, guidance)
        jax.block_until_ready(latents)
        t2 = time.perf_counter()
        images = self.decode(latents)
        t3 = time.perf_counter()
        self.timings = {"encode_s": t1 - t0, "denoise_s": t2 - t1, "decode_s": t3 - t2}
        return images


def _restore_tree(ckpt_dir: pathlib.Path, target, tree: str, step: int | None = None):
    """`state.<tree>` ('params' or 'ema') of the latest (or given) step of a workdir's checkpoints."""
    import orbax.checkpoint as ocp

    from lens_jax.train.checkpoint import ITEMS

    manager = ocp.CheckpointManager(ckpt_dir, item_names=ITEMS)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finished checkpoint under {ckpt_dir}")
        wanted = {tree: target}
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted), partial_restore=True)))
    finally:
        manager.close()
    return restored["state"][tree]
