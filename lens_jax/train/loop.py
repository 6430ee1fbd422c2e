"""The training loop: one linear function. Builds everything from the config, resumes from the
workdir when a checkpoint is there, and owns all I/O (data, metrics, checkpoints, sample grids)."""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from lens_jax import config as config_lib
from lens_jax.budget.flops import dit_train_flops
from lens_jax.budget.hardware import peak_flops_for
from lens_jax.data import pipeline, tokenizer as tokenizer_lib
from lens_jax.models.dit import DiTConfig
from lens_jax.parallel import rules
from lens_jax.parallel.mesh import make_mesh
from lens_jax.parallel.placement import batch_sharding, host_batch_to_global, replicated
from lens_jax.text.encoder import load_text_encoder
from lens_jax.train import samples as samples_lib
from lens_jax.train.checkpoint import Checkpointer, restore_params_only
from lens_jax.train.frozen import load_codec
from lens_jax.train.metrics import MetricsWriter
from lens_jax.train.optimizer import learning_rate_schedule, make_optimizer
from lens_jax.train.state import abstract_dit, abstract_train_state, init_train_state, train_state_shardings
from lens_jax.train.step import jit_train_step, make_train_step, step_config


def load_tokenizer(cfg, workdir: pathlib.Path | None):
    """The run's tokenizer: configured folder, else the built-in word tokenizer; saved into the workdir."""
    saved = workdir / "tokenizer" if workdir else None
    if cfg.text_encoder.tokenizer:
        tok = tokenizer_lib.load_tokenizer(cfg.text_encoder.tokenizer)
    elif saved is not None and saved.exists():
        tok = tokenizer_lib.load_tokenizer(saved)
    else:
        tok = tokenizer_lib.build_word_tokenizer()
    if saved is not None and not saved.exists() and jax.process_index() == 0:
        tok.save_pretrained(str(saved))
    vocab = int(cfg.text_encoder.model.get("vocab_size", 0))
    if vocab and len(tok) > vocab:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but config.text_encoder.model.vocab_size={vocab}")
    return tok


def check_sizes(cfg, dit_cfg: DiTConfig, codec, enc_cfg):
    if dit_cfg.in_channels != codec.channels:
        raise ValueError(f"config.model.in_channels={dit_cfg.in_channels} but the {codec.kind} codec gives {codec.channels} channels")
    if dit_cfg.enc_hidden_dim != enc_cfg.hidden_size:
        raise ValueError(f"config.model.enc_hidden_dim={dit_cfg.enc_hidden_dim} but the text encoder's hidden_size={enc_cfg.hidden_size}")
    if dit_cfg.num_text_layers != len(enc_cfg.selected_layers):
        raise ValueError(f"config.model.num_text_layers={dit_cfg.num_text_layers} but the text encoder selects "
                         f"{len(enc_cfg.selected_layers)} layers")


def sample_prompts(cfg):
    """Fixed prompts for the sample grid: configured ones, else captions of held-out scenes (+ their renders)."""
    if cfg.sample.prompts:
        return [p.strip() for p in cfg.sample.prompts.split("|") if p.strip()], None
    examples = pipeline.make_eval_examples(cfg.data, int(cfg.sample.num_prompts))
    key = "short_caption" if cfg.data.caption == "short" else "dense_caption"
    images = [e["image"] for e in examples]
    # a user dataset's eval images come at their own sizes (or unreadable): show them only when all are there
    references = images if all(img is not None for img in images) else None
    return [e[key] for e in examples], references


def bucket_sizes(buckets: str) -> list[tuple[int, int]]:
    out = []
    for b in buckets.split(","):
        w, h = b.lower().strip().split("x")
        out.append((int(w), int(h)))
    return out


def train(cfg, workdir: str | pathlib.Path, *, max_steps_this_run: int | None = None, progress: bool = True) -> dict:
    """Train until cfg.total_steps (or for `max_steps_this_run` steps); returns the last logged metrics."""
    config_lib.validate(cfg)
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = make_mesh(dict(cfg.mesh))
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.global_batch_size % dp:
        raise ValueError(f"config.data.global_batch_size={cfg.data.global_batch_size} does not divide over the "
                         f"data x fsdp = {dp} mesh devices")
    if is_main:
        (workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))

    with jax.set_mesh(mesh):
        tok = load_tokenizer(cfg, workdir)
        from lens_jax.text.encoder import encoder_config

        dit_cfg = DiTConfig.from_dict(cfg.model)
        # data.source='precomputed': batches carry latents and text features, so the step never runs the
        # frozen encoder and codec; they are loaded only to draw sample grids (load_frozen), after checking
        # that they are the ones that made the features.
        precomputed = cfg.data.source == "precomputed"

        def load_frozen():
            codec = load_codec(cfg.codec, mesh, workdir / "vae")
            return (codec, *load_text_encoder(cfg.text_encoder, mesh, workdir / "text_encoder"))

        if precomputed:
            from types import SimpleNamespace

            from lens_jax.data import precomputed as precomputed_lib
            from lens_jax.models.codec import codec_geometry

            precomputed_lib.check_run_config(cfg, tok)
            codec = enc_graphdef = enc_params = enc_shardings = None
            check_sizes(cfg, dit_cfg, SimpleNamespace(kind=cfg.codec.kind, channels=codec_geometry(cfg.codec)[1]),
                        encoder_config(cfg.text_encoder))
        else:
            codec, enc_graphdef, enc_params, enc_shardings = load_frozen()
            check_sizes(cfg, dit_cfg, codec, encoder_config(cfg.text_encoder))
        total = int(cfg.total_steps)
        tx = make_optimizer(cfg.optimizer, total)
        schedule = learning_rate_schedule(cfg.optimizer, total)
        use_ema = float(cfg.optimizer.ema_decay) > 0
        dit_graphdef, abstract_params = abstract_dit(dit_cfg)
        shardings = train_state_shardings(abstract_params, tx, mesh, use_ema)

        dataset = pipeline.make_train_dataset(
            cfg.data, tok, global_batch_size=int(cfg.data.global_batch_size), seed=int(cfg.seed),
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
        data_iter = iter(dataset)
        ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=int(cfg.keep_checkpoints))
        start = ckpt.latest_step()
        if start is not None:
            state = ckpt.restore(start, abstract_train_state(abstract_params, tx, shardings, use_ema), data_iter)
            if is_main:
                print(f"resumed from {ckpt.directory / str(start)}", flush=True)
        else:
            start = 0
            state = init_train_state(dit_cfg, tx, int(cfg.seed), shardings, use_ema)
            if cfg.init_from:
                target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      abstract_params, shardings.params)
                params = restore_params_only(cfg.init_from, target)
                state = state.replace(params=params, ema=params if use_ema else None)

        step_fn = jit_train_step(
            make_train_step(dit_graphdef, enc_graphdef, tx, schedule, step_config(cfg)),
            shardings, lambda nd: batch_sharding(mesh, nd),
            {} if precomputed else {"text_encoder": enc_shardings, "codec": jax.tree.map(lambda _: replicated(mesh), codec)},
            replicated(mesh),
        )
        frozen = {} if precomputed else {"text_encoder": enc_params, "codec": codec}
        writer = MetricsWriter(workdir, resume_step=start, enabled=is_main)
        peak = peak_flops_for(jax.devices()[0], float(cfg.hardware.peak_flops))
        base_key = jax.random.key(int(cfg.seed))
        end = total if max_steps_this_run is None else min(total, start + max_steps_this_run)

        bar = None
        if progress and is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
        last: dict = {}
        window_start, window_images, window_flops, window_tokens, skipped_total = time.perf_counter(), 0, 0.0, 0, 0
        for step in range(start, end):
            host = next(data_iter)
            b, hh, ww = host["images"].shape[:3] if "images" in host else host["latents"].shape[:3]
            img_tokens = (hh // codec.downsample) * (ww // codec.downsample) if "images" in host else hh * ww
            txt_tokens = host["text_mask"].shape[1] - (0 if "text_hidden" in host else int(cfg.text_encoder.offset))
            batch = host_batch_to_global(host, mesh)
            state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step), frozen)
            gb = int(cfg.data.global_batch_size)
            window_images += gb
            window_tokens += gb * (img_tokens + txt_tokens)
            window_flops += gb * dit_train_flops(dit_cfg, img_tokens, txt_tokens)
            done = step + 1
            if done % int(cfg.log_every) == 0 or done == end:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - window_start
                skipped_total += int(m["skipped"])
                m.update(
                    images_per_s=window_images / elapsed,
                    tokens_per_s=window_tokens / elapsed,
                    mfu=(window_flops / elapsed / (peak * jax.device_count())) if peak else None,
                    skipped_total=skipped_total,
                )
                writer.write(done, m)
                last = {"step": done, **m}
                if bar is not None:
                    bar.set_postfix(loss=f"{m['loss']:.4f}", img_s=f"{m['images_per_s']:.1f}")
                window_start, window_images, window_flops, window_tokens = time.perf_counter(), 0, 0.0, 0
            if done % int(cfg.checkpoint_every) == 0 or done == total:
                ckpt.save(done, state, cfg.to_dict(), data_iter)
            sample_every = int(cfg.sample_every)
            if (sample_every and done % sample_every == 0) or done == total:
                if precomputed:
                    codec, enc_graphdef, enc_params, _ = load_frozen()
                write_sample_grid(cfg, workdir, done, dit_graphdef, state, enc_graphdef, enc_params, codec, tok, mesh)
                if precomputed:  # not held while training
                    codec = enc_params = None
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        ckpt.close()
        writer.close()
    return last


def write_sample_grid(cfg, workdir, step, dit_graphdef, state, enc_graphdef, enc_params, codec, tok, mesh):
    prompts, references = sample_prompts(cfg)
    width = int(cfg.sample.width) or bucket_sizes(cfg.data.buckets)[0][0]
    height = int(cfg.sample.height) or bucket_sizes(cfg.data.buckets)[0][1]
    ids, mask = tokenizer_lib.tokenize(tok, prompts, int(cfg.data.max_text_len))
    params = state.ema if state.ema is not None else state.params
    images = samples_lib.generate_images(
        dit_graphdef, params, enc_graphdef, enc_params, codec, ids, mask, width=width, height=height,
        steps=int(cfg.sample.steps), guidance=float(cfg.sample.guidance), seed=int(cfg.seed),
        offset=int(cfg.text_encoder.offset), mesh=mesh,
    )
    if jax.process_index() == 0:
        path = samples_lib.save_grid(workdir / "samples" / f"step_{step:07d}.png", images, prompts, references)
        latest = workdir / "samples" / "latest.png"
        latest.write_bytes(path.read_bytes())
        return path
    return None
