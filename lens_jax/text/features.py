"""Token ids -> the DiT's text conditioning: the one function used by training, precompute and sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def text_features(encoder_graphdef, encoder_state, token_ids: jax.Array, mask: jax.Array, offset: int = 0):
    """Raw hidden states of the encoder's selected layers, [B, T-offset, L, D], and their mask.

    The encoder is frozen: gradients never flow into it. `offset` drops leading tokens (the
    official pipeline drops its 97-token chat preamble); a sequence not longer than the offset
    gives empty features, as upstream.
    """
    encoder = nnx.merge(encoder_graphdef, encoder_state)
    hidden = jax.lax.stop_gradient(encoder(token_ids, mask))
    mask = mask.astype(bool)
    if offset:
        hidden, mask = hidden[:, offset:], mask[:, offset:]
    hidden = jnp.where(mask[:, :, None, None], hidden, 0).astype(hidden.dtype)
    return hidden, mask


def drop_text(hidden: jax.Array, mask: jax.Array, drop: jax.Array):
    """Replace the rows where `drop` [B] is True by the empty prompt: zero features, all-false mask."""
    keep = ~drop.astype(bool)
    return hidden * keep[:, None, None, None].astype(hidden.dtype), mask & keep[:, None]
