"""The pure train step: (state, batch, rng, frozen) -> (state, metrics), jitted with explicit shardings.

`frozen` holds the frozen text encoder's weights (an argument, not a constant, so a 20B encoder is
not baked into the program, and not part of the state, so it is neither donated nor checkpointed).
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
    text_offset: int


def step_config(cfg) -> StepConfig:
    return StepConfig(
        text_dropout=float(cfg.loss.text_dropout),
        sigma_std=float(cfg.loss.sigma_std),
        loss_cfg=cfg.loss,
        grad_accum_steps=int(cfg.optimizer.grad_accum_steps),
        ema_decay=float(cfg.optimizer.ema_decay),
        text_offset=int(cfg.text_encoder.offset),
    )


def make_train_step(dit_graphdef, encoder_graphdef, codec, tx: optax.GradientTransformation,
                    schedule: Callable, sc: StepConfig):
    """Build the (unjitted) pure step; `jit_train_step` adds shardings and donation."""

    def microbatch_grads(params, frozen, mb, key):
        k_drop, k_sigma, k_noise = jax.random.split(key, 3)
        x0 = mb["latents"] if "latents" in mb else codec.encode(mb["images"])
        if "text_hidden" in mb:
            hidden, mask = mb["text_hidden"], mb["text_mask"].astype(bool)
        else:
            hidden, mask = text_features(encoder_graphdef, frozen, mb["text_ids"], mb["text_mask"], sc.text_offset)
        b = x0.shape[0]
        hidden, mask = drop_text(hidden, mask, jax.random.uniform(k_drop, (b,)) < sc.text_dropout)
        mu = L.sigma_mu(x0.shape[1] * x0.shape[2], sc.loss_cfg)
        sigma = L.sample_sigma(k_sigma, b, mu, sc.sigma_std)
        eps = jax.random.normal(k_noise, x0.shape, jnp.float32)
        xt, target = L.noisy_input(x0.astype(jnp.float32), eps, sigma)
        weight = mb["valid"].astype(jnp.float32) if "valid" in mb else jnp.ones((b,), jnp.float32)

        def loss_fn(p):
            model = nnx.merge(dit_graphdef, p)
            pred = model(xt, sigma, hidden, mask)
            total, count = L.weighted_mse(pred, target, weight)
            return total, count

        (total, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return total, count, grads

    def train_step(state: TrainState, batch: dict, rng: jax.Array, frozen) -> tuple[TrainState, dict]:
        a = sc.grad_accum_steps
        if a == 1:
            total, count, grads = microbatch_grads(state.params, frozen, batch, rng)
        else:
            micro = jax.tree.map(lambda x: x.reshape((a, x.shape[0] // a) + x.shape[1:]), batch)
            keys = jax.random.split(rng, a)
            zeros = jax.tree.map(jnp.zeros_like, state.params)

            def body(carry, xs):
                t, c, g = carry
                mt, mc, mg = microbatch_grads(state.params, frozen, xs[0], xs[1])
                return (t + mt, c + mc, jax.tree.map(jnp.add, g, mg)), None

            (total, count, grads), _ = jax.lax.scan(body, (0.0, 0.0, zeros), (micro, keys))
        # Gradients of the SUM of per-example losses: divide by the number of valid examples.
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            d = sc.ema_decay
            ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
        n = jax.tree.leaves(batch)[0].shape[0]
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
