"""The pure train step: (state, batch, rng, frozen) -> (state, metrics), jitted with explicit shardings.

`frozen` = {"text_encoder": encoder Params, "codec": the latent codec (a pytree: the VAE's weights,
or nothing for the pixel codec)}: arguments, not constants, so a 20B encoder and an 84M VAE are not
baked into the program, and not part of the state, so they are neither donated nor checkpointed.
A batch that carries `latents` / `text_hidden` (precomputed) does not touch them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lens_jax.text.features import drop_text, text_features
from lens_jax.train import loss as L
from lens_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
    text_dropout: float
    sigma_std: float
    loss_cfg: Any
    grad_accum_steps: int
    ema_decay: float
    ema_warmup: float
    text_offset: int


def step_config(cfg) -> StepConfig:
    return StepConfig(
        text_dropout=float(cfg.loss.text_dropout),
        sigma_std=float(cfg.loss.sigma_std),
        loss_cfg=cfg.loss,
        grad_accum_steps=int(cfg.optimizer.grad_accum_steps),
        ema_decay=float(cfg.optimizer.ema_decay),
        ema_warmup=float(cfg.optimizer.ema_warmup),
        text_offset=int(cfg.text_encoder.offset),
    )


def make_train_step(dit_graphdef, encoder_graphdef, tx: optax.GradientTransformation,
                    schedule: Callable, sc: StepConfig):
    """Build the (unjitted) pure step; `jit_train_step` adds shardings and donation."""

    def microbatch_grads(params, frozen, mb):
        x0 = mb["latents"] if "latents" in mb else frozen["codec"].encode(mb["images"])
        if "text_hidden" in mb:
            hidden, mask = mb["text_hidden"], mb["text_mask"].astype(bool)
        else:
            hidden, mask = text_features(encoder_graphdef, frozen["text_encoder"], mb["text_ids"], mb["text_mask"],
                                         sc.text_offset)
        hidden, mask = drop_text(hidden, mask, mb["drop"])
        xt, target = L.noisy_input(x0.astype(jnp.float32), mb["eps"], mb["sigma"])
        weight = mb["valid"].astype(jnp.float32) if "valid" in mb else jnp.ones(mb["sigma"].shape, jnp.float32)

        def loss_fn(p):
            model = nnx.merge(dit_graphdef, p)
            return L.weighted_mse(model(xt, mb["sigma"], hidden, mask), target, weight)

        (total, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return total, count, grads

    def train_step(state: TrainState, batch: dict, rng: jax.Array, frozen) -> tuple[TrainState, dict]:
        a = sc.grad_accum_steps
        n = jax.tree.leaves(batch)[0].shape[0]
        codec = frozen.get("codec")
        grid = batch["latents"].shape[1:3] if "latents" in batch else tuple(d // codec.downsample for d in batch["images"].shape[1:3])
        k_drop, k_sigma, k_noise = jax.random.split(rng, 3)
        # Per-example randomness is drawn for the whole batch, so accumulation over micro-batches
        # sees exactly the draws of one large step.
        batch = dict(batch)
        batch["drop"] = jax.random.uniform(k_drop, (n,)) < sc.text_dropout
        batch["sigma"] = L.sample_sigma(k_sigma, n, L.sigma_mu(grid[0] * grid[1], sc.loss_cfg), sc.sigma_std)
        channels = batch["latents"].shape[-1] if "latents" in batch else codec.channels
        batch["eps"] = jax.random.normal(k_noise, (n,) + tuple(grid) + (channels,), jnp.float32)
        if a == 1:
            total, count, grads = microbatch_grads(state.params, frozen, batch)
        else:
            micro = {k: v.reshape((a, n // a) + v.shape[1:]) for k, v in batch.items()}
            zeros = jax.tree.map(jnp.zeros_like, state.params)

            def body(carry, mb):
                t, c, g = carry
                mt, mc, mg = microbatch_grads(state.params, frozen, mb)
                return (t + mt, c + mc, jax.tree.map(jnp.add, g, mg)), None

            (total, count, grads), _ = jax.lax.scan(body, (0.0, 0.0, zeros), micro)
        # Gradients of the SUM of per-example losses: divide by the number of valid examples.
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            d = jnp.float32(sc.ema_decay)
            if sc.ema_warmup > 0:
                # early on the average would be mostly the initial weights (0.999**500 = 0.61): cap the
                # decay at (1 + t) / (warmup + t), i.e. average over roughly the last t / (warmup - 1) steps
                t = state.step.astype(jnp.float32)
                d = jnp.minimum(d, (1.0 + t) / (sc.ema_warmup + t))
            ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
        metrics = {
            "loss": total / denom,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "skipped": n - count,
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

    return train_step


def jit_train_step(train_step, state_shardings, batch_sharding_fn, frozen_shardings, replicated):
    """jax.jit with explicit in/out shardings; the state is donated (updated in place)."""

    def shard_batch(batch):
        return {k: batch_sharding_fn(v.ndim) for k, v in batch.items()}

    cache: dict = {}

    def call(state, batch, rng, frozen):
        key = tuple(sorted((k, v.shape) for k, v in batch.items()))
        if key not in cache:
            cache[key] = jax.jit(
                train_step,
                in_shardings=(state_shardings, shard_batch(batch), replicated, frozen_shardings),
                out_shardings=(state_shardings, replicated),
                donate_argnums=(0,),
            )
        return cache[key](state, batch, rng, frozen)

    call.compiled_for = cache
    return call
