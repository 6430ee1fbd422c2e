"""The pure train step: skipped records, gradient accumulation, EMA, determinism (1 CPU device)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.config import base_config, set_field
from lens_jax.models.dit import DiTConfig
from lens_jax.parallel.mesh import make_mesh
from lens_jax.parallel.placement import batch_sharding, host_batch_to_global, replicated
from lens_jax.train.optimizer import learning_rate_schedule, make_optimizer
from lens_jax.train.state import abstract_dit, init_train_state, train_state_shardings
from lens_jax.train.step import jit_train_step, make_train_step, step_config


def _cfg(**overrides):
    c = base_config()
    for k, v in dict(
        **{"model.num_layers": 2, "model.num_attention_heads": 2, "model.attention_head_dim": 16,
           "model.axes_dims_rope": (4, 6, 6), "model.mlp_hidden_dim": 48, "model.in_channels": 12,
           "model.out_channels": 12, "model.enc_hidden_dim": 8, "model.num_text_layers": 2, "model.init": "fan_in",
           "mesh.data": 1, "optimizer.lr": 1e-2},
        **overrides,
    ).items():
        set_field(c, k, v)
    return c


def _setup(cfg):
    mesh = make_mesh(dict(cfg.mesh))
    dit_cfg = DiTConfig.from_dict(cfg.model)
    tx = make_optimizer(cfg.optimizer, int(cfg.total_steps))
    use_ema = float(cfg.optimizer.ema_decay) > 0
    graphdef, abstract = abstract_dit(dit_cfg)
    sh = train_state_shardings(abstract, tx, mesh, use_ema)
    step = jit_train_step(
        make_train_step(graphdef, None, tx, learning_rate_schedule(cfg.optimizer, 100), step_config(cfg)),
        sh, lambda nd: batch_sharding(mesh, nd), {}, replicated(mesh),
    )
    return mesh, init_train_state(dit_cfg, tx, 0, sh, use_ema), step


def _batch(n=8, valid=None, seed=0):
    r = np.random.default_rng(seed)
    return {
        "latents": r.standard_normal((n, 3, 2, 12)).astype(np.float32),
        "text_hidden": r.standard_normal((n, 5, 2, 8)).astype(np.float32),
        "text_mask": np.arange(5)[None, :] < r.integers(1, 6, size=(n, 1)),
        "valid": np.ones(n, np.float32) if valid is None else np.asarray(valid, np.float32),
    }


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_invalid_records_are_skipped_and_counted():
    cfg = _cfg()
    valid = [1, 0, 1, 1, 0, 1, 1, 1]
    mesh, s1, step = _setup(cfg)
    with jax.set_mesh(mesh):
        a = _batch(valid=valid)
        s1, m1 = step(s1, host_batch_to_global(a, mesh), jax.random.key(3), {})
        # Garbage in the skipped rows must change nothing.
        b = {k: v.copy() for k, v in a.items()}
        for i in (1, 4):
            b["latents"][i] = 1e6
            b["text_hidden"][i] = -1e6
        _, s2, _ = _setup(cfg)
        s2, m2 = step(s2, host_batch_to_global(b, mesh), jax.random.key(3), {})
    assert float(m1["skipped"]) == 2.0
    assert float(m1["loss"]) == float(m2["loss"])
    for x, y in zip(_leaves(s1), _leaves(s2)):
        np.testing.assert_array_equal(x, y)


def test_gradient_accumulation_equals_one_large_step():
    cfg1, cfg2 = _cfg(), _cfg(**{"optimizer.grad_accum_steps": 4})
    batch = _batch(n=8)
    results = []
    for cfg in (cfg1, cfg2):
        mesh, state, step = _setup(cfg)
        trace = []
        with jax.set_mesh(mesh):
            for i in range(2):
                state, m = step(state, host_batch_to_global(batch, mesh), jax.random.key(i), {})
                trace += [float(m["loss"]), float(m["grad_norm"])]
        results.append(trace)
    # Loss and gradient norm of both steps: the second depends on the first update.
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5)


def test_ema_tracks_params_and_step_is_deterministic():
    cfg = _cfg(**{"optimizer.ema_decay": 0.5})
    out = []
    for _ in range(2):
        mesh, state, step = _setup(cfg)
        p0 = _leaves(state)
        with jax.set_mesh(mesh):
            state, m = step(state, host_batch_to_global(_batch(), mesh), jax.random.key(7), {})
        out.append((float(m["loss"]), state))
    assert out[0][0] == out[1][0]
    state = out[0][1]
    assert int(state.step) == 1
    for e, p, q in zip(jax.tree.leaves(state.ema), _leaves(state), p0):
        np.testing.assert_allclose(np.asarray(e), 0.5 * q + 0.5 * p, rtol=1e-6, atol=1e-7)


def test_ema_warmup_caps_the_decay_early():
    """With warmup w the first update uses decay min(d, 1 / w): the average forgets the init weights fast."""
    cfg = _cfg(**{"optimizer.ema_decay": 0.999, "optimizer.ema_warmup": 4.0})
    mesh, state, step = _setup(cfg)
    p0 = _leaves(state)
    with jax.set_mesh(mesh):
        state, _ = step(state, host_batch_to_global(_batch(), mesh), jax.random.key(7), {})
    for e, p, q in zip(jax.tree.leaves(state.ema), _leaves(state), p0):
        np.testing.assert_allclose(np.asarray(e), 0.25 * q + 0.75 * p, rtol=1e-6, atol=1e-7)


def test_text_dropout_one_means_every_row_is_unconditional():
    """With dropout 1, the text features cannot matter: the empty prompt (zero features, no tokens)."""
    cfg = _cfg(**{"loss.text_dropout": 1.0})
    losses = []
    for seed in (0, 1):
        b = _batch()
        b["text_hidden"] = np.random.default_rng(seed + 10).standard_normal(b["text_hidden"].shape).astype(np.float32)
        mesh, state, step = _setup(cfg)
        with jax.set_mesh(mesh):
            _, m = step(state, host_batch_to_global(b, mesh), jax.random.key(1), {})
        losses.append(float(m["loss"]))
    assert losses[0] == losses[1]


def test_bf16_compute_keeps_float32_master_weights():
    cfg = _cfg(**{"model.dtype": "bfloat16"})
    mesh, state, step = _setup(cfg)
    with jax.set_mesh(mesh):
        state, m = step(state, host_batch_to_global(_batch(), mesh), jax.random.key(0), {})
    assert np.isfinite(float(m["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
