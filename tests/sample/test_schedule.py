"""Sigma schedule and mu against the SPEC formulas, CFG rescale against numpy, one model call per Turbo step."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lens_jax.sample.euler import cfg_combine, euler_sample
from lens_jax.sample.presets import PRESETS, get_preset
from lens_jax.sample.schedule import schedule_mu, sigma_schedule


def spec_mu(L, N):  # SPEC section 4, written out independently
    m200 = 1.6927e-4 * L + 0.45667
    if L > 4300:
        return m200
    m10 = 8.738e-5 * L + 1.89833
    return m10 + (m200 - m10) * (N - 10) / 190.0


def spec_sigmas(N, L):
    mu = spec_mu(L, N)
    out = []
    for i in range(N):
        s = 1.0 - i * (1.0 - 1.0 / N) / (N - 1) if N > 1 else 1.0
        out.append(math.exp(mu) / (math.exp(mu) + 1.0 / s - 1.0))
    return np.array(out + [0.0])


@pytest.mark.parametrize("steps,tokens", [(1, 16), (4, 4096), (20, 4096), (50, 1024), (20, 64), (20, 4300),
                                          (20, 4301), (4, 8100), (200, 16384), (7, 2304)])
def test_sigmas_match_spec(steps, tokens):
    assert schedule_mu(tokens, steps) == pytest.approx(spec_mu(tokens, steps), rel=1e-12, abs=1e-12)
    s = sigma_schedule(steps, tokens)
    np.testing.assert_allclose(s, spec_sigmas(steps, tokens), rtol=1e-12, atol=1e-12)
    assert s.shape == (steps + 1,) and s[0] == pytest.approx(1.0) and s[-1] == 0.0
    assert np.all(np.diff(s) < 0)


def test_worked_values():
    assert schedule_mu(4096, 20) == pytest.approx(2.198, abs=5e-4)
    assert schedule_mu(4096, 4) == pytest.approx(2.291, abs=5e-4)
    # above 4300 tokens mu no longer depends on the step count
    assert schedule_mu(6000, 4) == schedule_mu(6000, 50) == pytest.approx(1.6927e-4 * 6000 + 0.45667)


def test_presets():
    assert (PRESETS["lens"].steps, PRESETS["lens"].guidance) == (20, 5.0)
    assert (PRESETS["turbo"].steps, PRESETS["turbo"].guidance) == (4, 1.0)
    assert (PRESETS["base"].steps, PRESETS["base"].guidance) == (50, 5.0)
    assert not get_preset("turbo").use_cfg and get_preset("Lens").use_cfg
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("fast")


def numpy_cfg(c, u, g):
    c, u = np.asarray(c, np.float64), np.asarray(u, np.float64)
    comb = u + g * (c - u)
    out = np.empty_like(comb)
    for idx in np.ndindex(comb.shape[:-1]):
        nc, nb = np.linalg.norm(c[idx]), np.linalg.norm(comb[idx])
        out[idx] = comb[idx] * (nc / nb if nb > 0 else 1.0)
    return out


def test_cfg_rescale_matches_numpy_incl_zero_norm():
    rng = np.random.default_rng(0)
    g = 5.0
    c = rng.standard_normal((2, 6, 128)).astype(np.float32)
    u = rng.standard_normal((2, 6, 128)).astype(np.float32)
    c[0, 1] = u[0, 1] = 0.0  # cond = uncond = 0: comb = 0
    c[1, 2], u[1, 2] = 4.0, 5.0  # comb = 5 + 5 (4 - 5) = 0 exactly, with a non-zero cond: factor 1, not nc/0
    c[1, 3] = 0.0  # zero cond, non-zero comb: rescaled to zero
    got = np.asarray(cfg_combine(jnp.asarray(c), jnp.asarray(u), g))
    want = numpy_cfg(c, u, g)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[0, 1], 0.0)
    assert np.abs(got[1, 2]).max() == 0.0 and np.abs(got[1, 3]).max() == 0.0
    # the rescaled result keeps the cond norm per token
    norms = np.linalg.norm(got, axis=-1)
    np.testing.assert_allclose(norms[0, 0], np.linalg.norm(c[0, 0]), rtol=1e-5)


CALLS: list[int] = []  # rows of every model call, appended at run time (module level: the jit cache may reuse a trace)


class CountingModel(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.full((), 0.5))

    def __call__(self, x, sigma, hidden, mask):
        rows = x.shape[0]
        jax.debug.callback(lambda: CALLS.append(rows))
        return x * self.w[...] + sigma[:, None, None, None]


def _run(preset, batch=2):
    graphdef, state = nnx.split(CountingModel())
    p = get_preset(preset)
    noise = jnp.ones((batch, 2, 2, 4))
    sig = jnp.asarray(sigma_schedule(p.steps, 4), jnp.float32)
    hidden, mask = jnp.zeros((batch, 3, 1, 8)), jnp.ones((batch, 3), bool)
    CALLS.clear()
    out = euler_sample(graphdef, state, noise, sig, hidden, mask, jnp.zeros_like(hidden), jnp.zeros_like(mask),
                       jnp.float32(p.guidance), use_cfg=p.use_cfg)
    jax.block_until_ready(out)
    jax.effects_barrier()
    return list(CALLS), graphdef, state


def test_turbo_one_model_call_per_step():
    calls, _, _ = _run("turbo", batch=2)
    assert calls == [2] * 4  # 4 steps, one call each, batch rows only (no uncond rows)
    calls, _, _ = _run("lens", batch=2)
    assert calls == [4] * 20  # CFG: one call per step on [cond; uncond]


def test_pipeline_denoise_turbo_skips_uncond():
    from lens_jax.models.codec import PixelCodec
    from lens_jax.sample.pipeline import LensPipeline

    graphdef, state = nnx.split(CountingModel())
    pipe = LensPipeline(graphdef, state, None, None, None, PixelCodec(1))
    noise = pipe.noise(0, 3, 1, 2, 2)
    hidden, mask = jnp.zeros((3, 3, 1, 8)), jnp.ones((3, 3), bool)
    CALLS.clear()
    jax.block_until_ready(pipe.denoise(noise, pipe.sigmas(4, 2, 2), hidden, mask, jnp.zeros_like(hidden),
                                       jnp.zeros_like(mask), 1.0))
    jax.effects_barrier()
    assert CALLS == [3] * 4
