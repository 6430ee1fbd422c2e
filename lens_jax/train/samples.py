"""Periodic sample grids during training: fixed prompts, fixed noise, the Euler sampler, a PNG."""

from __future__ import annotations

import pathlib
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lens_jax.parallel.placement import replicated
from lens_jax.sample.euler import euler_sample, initial_noise
from lens_jax.sample.schedule import sigma_schedule
from lens_jax.text.features import text_features


def generate_images(dit_graphdef, dit_params, enc_graphdef, enc_params, codec, token_ids, token_mask, *,
                    width: int, height: int, steps: int, guidance: float, seed: int, offset: int, mesh):
    """uint8 images [N, H, W, 3] for tokenised prompts (replicated over the mesh)."""
    rep = replicated(mesh)
    put = lambda x: jax.make_array_from_callback(np.shape(x), rep, lambda idx: np.asarray(x)[idx])
    ids, mask = put(token_ids), put(token_mask)
    hidden, hmask = jax.jit(text_features, static_argnums=(0, 4))(enc_graphdef, enc_params, ids, mask, offset)
    h, w = height // codec.downsample, width // codec.downsample
    n = ids.shape[0]
    noise = initial_noise(jax.random.key(seed), n, h, w, codec.channels)
    sigmas = jnp.asarray(sigma_schedule(steps, h * w), jnp.float32)
    use_cfg = guidance != 1.0
    latents = euler_sample(dit_graphdef, dit_params, noise, sigmas, hidden, hmask,
                           jnp.zeros_like(hidden), jnp.zeros_like(hmask), jnp.float32(guidance), use_cfg=use_cfg)
    return np.asarray(multihost_utils.process_allgather(codec.decode(latents), tiled=True))


def save_grid(path: str | pathlib.Path, images: np.ndarray, titles: list[str], references=None):
    """Samples in the top row, ground-truth renders of the same scenes (if given) below, titles wrapped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    rows = 2 if references is not None else 1
    fig, axes = plt.subplots(rows, n, figsize=(2.2 * n, 2.4 * rows + 1.2), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(images[i])
        axes[0, i].set_title("\n".join(textwrap.wrap(titles[i], 28)[:4]), fontsize=6)
        if references is not None:
            axes[1, i].imshow(references[i])
        for r in range(rows):
            axes[r, i].set_xticks([])
            axes[r, i].set_yticks([])
    axes[0, 0].set_ylabel("sample", fontsize=8)
    if references is not None:
        axes[1, 0].set_ylabel("ground truth", fontsize=8)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
