"""MXFP4 (OCP microscaling FP4) as GPT-OSS stores its expert weights (SPEC section 2).

Along the last (input) axis, groups of 32 values share one uint8 scale s (value 2^(s - 127)); each
value is an e2m1 nibble, two per byte: byte j of a 16-byte group holds element 2j in its low nibble
and element 2j + 1 in its high nibble. Nibble table (bit 3 = sign, so 8 is -0):
    [0, .5, 1, 1.5, 2, 3, 4, 6, -0, -.5, -1, -1.5, -2, -3, -4, -6]

`dequantize(blocks [..., G, 16], scales [..., G]) -> float32 [..., G * 32]` is exact (every value is
e2m1 x 2^k, so bf16 holds it too). `quantize(w [..., N]) -> (blocks, scales)` inverts it:
  - with `scales_hint` (the scales of the checkpoint the values came from), a group whose values are
    all exactly representable under its hinted scale reuses it: an imported checkpoint re-exports to
    its original bytes, including -0 nibbles (taken from the sign bit) and all-zero groups;
  - otherwise the OCP choice: s = floor(log2(max |w|)) - 2 + 127 (127 for an all-zero group), values
    rounded to the nearest e2m1 value (ties to the even code), saturating at +-6.
"""

from __future__ import annotations

import numpy as np

from lens_jax.convert.common import ConvertError, fmt_shape

FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
_POS = FP4_VALUES[:8]
_MIDS = (_POS[1:] + _POS[:-1]) / 2  # decision boundaries between consecutive codes
GROUP = 32
BYTES_PER_GROUP = 16


def check_pair(blocks_shape, scales_shape, blocks_key: str = "blocks", scales_key: str = "scales") -> None:
    blocks_shape, scales_shape = tuple(blocks_shape), tuple(scales_shape)
    if len(blocks_shape) < 2 or blocks_shape[-1] != BYTES_PER_GROUP or blocks_shape[:-1] != scales_shape:
        raise ConvertError(
            f"MXFP4 pair {blocks_key!r} {fmt_shape(blocks_shape)} / {scales_key!r} {fmt_shape(scales_shape)}: "
            f"expected blocks [..., G, 16] and scales [..., G]"
        )


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [..., G * 32] from uint8 blocks [..., G, 16] and uint8 scales [..., G]."""
    check_pair(blocks.shape, scales.shape)
    blocks = np.asarray(blocks, np.uint8)
    out = np.empty(blocks.shape[:-1] + (GROUP,), np.float32)
    out[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    out[..., 1::2] = FP4_VALUES[blocks >> 4]
    exp = np.asarray(scales, np.int32)[..., None] - 127
    with np.errstate(over="ignore"):
        out = np.ldexp(out, exp, out=out)
    return out.reshape(blocks.shape[:-2] + (blocks.shape[-2] * GROUP,))


def _codes(mag: np.ndarray) -> np.ndarray:
    """Nearest e2m1 magnitude code 0..7 of |q| (ties to the even code), saturating at 6."""
    lo = np.searchsorted(_MIDS, mag, side="left")
    hi = np.searchsorted(_MIDS, mag, side="right")
    return np.where(lo == hi, lo, np.where(lo % 2 == 0, lo, hi)).astype(np.uint8)


def _quantize_2d(w: np.ndarray, hint: np.ndarray | None):
    """w float32 [R, G, 32] -> nibbles [R, G, 32] uint8, scales [R, G] uint8."""
    mag = np.abs(w)
    amax = mag.max(axis=-1)
    _, ex = np.frexp(amax)  # amax = m * 2^ex, m in [0.5, 1): floor(log2(amax)) = ex - 1, exactly
    e = np.where(amax > 0, ex.astype(np.int32) - 1 - 2, 0)
    e = np.clip(e, -127, 128)
    if hint is not None:
        eh = hint.astype(np.int32) - 127
        qh = np.ldexp(mag, -eh[..., None])
        exact = np.all(_POS[_codes(qh)] == qh, axis=-1)
        e = np.where(exact, eh, e)
    q = np.ldexp(mag, -e[..., None])
    codes = _codes(q)
    nib = codes | (np.signbit(w).astype(np.uint8) << 3)
    return nib, (e + 127).astype(np.uint8)


def quantize(w: np.ndarray, scales_hint: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(blocks uint8 [..., N/32, 16], scales uint8 [..., N/32]) from float w [..., N]."""
    w = np.asarray(w)
    n = w.shape[-1]
    if n % GROUP:
        raise ConvertError(f"MXFP4 needs the last axis to be a multiple of 32, got shape {fmt_shape(w.shape)}")
    lead = w.shape[:-1]
    g = n // GROUP
    if scales_hint is not None and tuple(scales_hint.shape) != lead + (g,):
        scales_hint = None
    rows = int(np.prod(lead)) if lead else 1
    flat = w.reshape(rows, g, GROUP)
    hint = None if scales_hint is None else np.asarray(scales_hint, np.uint8).reshape(rows, g)
    blocks = np.empty((rows, g, BYTES_PER_GROUP), np.uint8)
    scales = np.empty((rows, g), np.uint8)
    step = max(1, (1 << 24) // max(1, n))  # bounded temporaries (~16M values per chunk)
    for r in range(0, rows, step):
        nib, s = _quantize_2d(flat[r:r + step].astype(np.float32), None if hint is None else hint[r:r + step])
        blocks[r:r + step] = nib[..., 0::2] | (nib[..., 1::2] << 4)
        scales[r:r + step] = s
    return blocks.reshape(lead + (g, BYTES_PER_GROUP)), scales.reshape(lead + (g,))


class Pair:
    """How one logical expert tensor is stored as an MXFP4 blocks/scales pair.

    `transpose`: the logical tensor is [E, in, out] (transformers' gate_up_proj / down_proj) while
    MXFP4 always groups along the input axis of an [E, out, in] tensor; False when the logical tensor
    is already [E, out, in] (OpenAI's `original/` mlp1_weight / mlp2_weight).
    """

    def __init__(self, logical: str, blocks: str, scales: str, transpose: bool):
        self.logical, self.blocks, self.scales, self.transpose = logical, blocks, scales, transpose

    def stored_shapes(self, logical_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
        shape = tuple(logical_shape)
        if self.transpose:
            shape = shape[:-2] + (shape[-1], shape[-2])
        if shape[-1] % GROUP:
            raise ConvertError(f"{self.logical} {fmt_shape(logical_shape)}: input width {shape[-1]} is not a multiple of 32")
        g = shape[-1] // GROUP
        return shape[:-1] + (g, BYTES_PER_GROUP), shape[:-1] + (g,)

    def decode(self, blocks: np.ndarray, scales: np.ndarray, dtype=np.float32) -> np.ndarray:
        """The logical tensor in `dtype` (exact in float32 and bfloat16), one leading slice at a time
        so the float32 temporaries stay at one expert's size."""
        check_pair(blocks.shape, scales.shape, self.blocks, self.scales)
        shape = blocks.shape[:-2] + (blocks.shape[-2] * GROUP,)
        if self.transpose:
            shape = shape[:-2] + (shape[-1], shape[-2])
        out = np.empty(shape, dtype)
        lead = blocks.shape[:-3] if blocks.ndim > 3 else ()
        for idx in np.ndindex(*lead):
            w = dequantize(blocks[idx], scales[idx])
            out[idx] = w.T if self.transpose else w
        return out

    def encode(self, w: np.ndarray, scales_hint: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(blocks, scales) of the logical tensor w, one leading slice at a time."""
        w = np.asarray(w)
        bshape, sshape = self.stored_shapes(w.shape)
        if scales_hint is not None and tuple(scales_hint.shape) != sshape:
            scales_hint = None
        blocks, scales = np.empty(bshape, np.uint8), np.empty(sshape, np.uint8)
        for idx in np.ndindex(*w.shape[:-2]):
            x = w[idx].T if self.transpose else w[idx]
            blocks[idx], scales[idx] = quantize(x, None if scales_hint is None else scales_hint[idx])
        return blocks, scales
