"""The Lens sigma schedule (SPEC section 4): linspace(1, 1/N, N), mu-shifted, then a final 0."""

from __future__ import annotations

import math

import numpy as np


def schedule_mu(image_tokens: int, steps: int) -> float:
    """mu from the image token count L and the step count N."""
    high = 1.6927e-4 * image_tokens + 0.45667
    if image_tokens > 4300:
        return high
    low = 8.738e-5 * image_tokens + 1.89833
    return low + (high - low) * (steps - 10) / (200 - 10)


def shift_sigmas(sigmas: np.ndarray, mu: float) -> np.ndarray:
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))


def sigma_schedule(steps: int, image_tokens: int, mu: float | None = None) -> np.ndarray:
    """N + 1 sigmas from 1 down to 0 (float64 on the host; cast when used)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    mu = schedule_mu(image_tokens, steps) if mu is None else mu
    base = np.linspace(1.0, 1.0 / steps, steps, dtype=np.float64)
    return np.concatenate([shift_sigmas(base, mu), [0.0]])
