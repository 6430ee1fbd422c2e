"""Euler on an analytically known flow: data x0 ~ N(m, s^2) per channel.

With x_t = a x0 + sigma eps (a = 1 - sigma), x_t ~ N(a m, V), V = a^2 s^2 + sigma^2, and the exact
velocity E[eps - x0 | x_t = x] = (sigma - a s^2) / V * (x - a m) - m. The ODE is linear, so Euler maps
the initial noise affinely, x_end = A eps + B, and the exact flow gives A = s, B = m.

Tolerances: Euler is first order, so |A - s|, |B - m| = O(1/N): we measure A and B exactly (pushing
eps = 0 and eps = 1 through the sampler), require the error at N = 400 to be below 1e-2 and to shrink
~2x from N = 200 to N = 400 (first-order convergence, not a loose bound hiding a bias). The sampled
check then uses n = 65536 draws per channel: the sample mean has standard error s/sqrt(n) (~1.6e-3
for s = 0.4) and the sample std ~ s/sqrt(2n); we allow 5 standard errors plus the measured Euler error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lens_jax.sample.euler import euler_sample
from lens_jax.sample.schedule import sigma_schedule

M = np.array([0.7, -1.2, 0.0, 2.5], np.float32)
S = np.array([0.4, 1.5, 0.05, 1.0], np.float32)


class ExactVelocity(nnx.Module):
    def __init__(self):
        self.m = nnx.Param(jnp.asarray(M))
        self.s = nnx.Param(jnp.asarray(S))

    def __call__(self, x, sigma, hidden, mask):
        sig = sigma[:, None, None, None].astype(jnp.float32)
        a = 1.0 - sig
        m, s2 = self.m[...], self.s[...] ** 2
        v = a * a * s2 + sig * sig
        return (sig - a * s2) / v * (x - a * m) - m


def run(noise, steps, tokens=4608):
    # L > 4300: mu does not depend on N (below it, mu is extrapolated past N = 200 and goes very negative)
    graphdef, state = nnx.split(ExactVelocity())
    b = noise.shape[0]
    hidden, mask = jnp.zeros((b, 1, 1, 1)), jnp.zeros((b, 1), bool)
    sig = jnp.asarray(sigma_schedule(steps, tokens), jnp.float32)
    out = euler_sample(graphdef, state, jnp.asarray(noise), sig, hidden, mask, hidden, mask, jnp.float32(1.0),
                       use_cfg=False)
    return np.asarray(out, np.float64)


def affine_map(steps):
    probe = np.stack([np.zeros((1, 1, 4), np.float32), np.ones((1, 1, 4), np.float32)])
    out = run(probe, steps)
    b = out[0, 0, 0]
    return out[1, 0, 0] - b, b


def test_euler_affine_map_converges_first_order():
    a200, b200 = affine_map(200)
    a400, b400 = affine_map(400)
    err200 = max(np.abs(a200 - S).max(), np.abs(b200 - M).max())
    err400 = max(np.abs(a400 - S).max(), np.abs(b400 - M).max())
    assert err400 < 1e-2, (a400, b400)
    assert 1.6 < err200 / err400 < 2.4, (err200, err400)


def test_euler_lands_on_data_distribution():
    steps, n = 400, 65536
    a, b = affine_map(steps)
    disc_mean, disc_std = np.abs(b - M), np.abs(a - S)
    eps = jax.random.normal(jax.random.key(0), (n, 1, 1, 4), jnp.float32)
    x = run(np.asarray(eps), steps)[:, 0, 0]
    mean, std = x.mean(0), x.std(0)
    assert np.all(np.abs(mean - M) <= 5 * S / np.sqrt(n) + disc_mean + 1e-5), (mean, M)
    assert np.all(np.abs(std - S) <= 5 * S / np.sqrt(2 * n) + disc_std + 1e-5), (std, S)
