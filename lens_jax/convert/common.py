"""Shared pieces of the converters: the error type, the key-table entry, dtype names, sizes.

A key table (keys_lens_dit.py, keys_gpt_oss.py) is a list of `Entry`s. One entry ties one or more
*logical* official tensors (its `keys`, e.g. `transformer_blocks.3.attn.img_qkv.weight`) to one or
more slots of NNX parameters (its `targets`: an NNX path plus the index on the leading stacked axis,
or None for the whole array), with a pure numpy transform each way. Logical tensors are the plain
(dequantised) tensors; a storage codec (mxfp4.py) may store one logical tensor as several stored ones.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import ml_dtypes
import numpy as np


class ConvertError(ValueError):
    """A checkpoint, config or directory that cannot be converted; the message names the culprit."""


@dataclasses.dataclass(frozen=True)
class Target:
    path: tuple[str, ...]  # NNX parameter path
    index: int | None = None  # slot on the leading (stacked) axis; None = the whole array

    def __str__(self):
        return ".".join(map(str, self.path)) + ("" if self.index is None else f"[{self.index}]")


@dataclasses.dataclass(frozen=True)
class Entry:
    keys: tuple[str, ...]  # logical official keys, read together
    shapes: tuple[tuple[int, ...], ...]  # their shapes as the config implies
    targets: tuple[Target, ...]
    to_nnx: Callable[[list[np.ndarray]], list[np.ndarray]]  # arrays of `keys` -> arrays of `targets`
    from_nnx: Callable[[list[np.ndarray]], list[np.ndarray]]  # the inverse

    @property
    def paths(self) -> tuple[tuple[str, ...], ...]:
        return tuple(t.path for t in self.targets)


def linear_entry(key: str, shape, target: Target, nnx_shape) -> Entry:
    """A torch Linear weight [out, in] <-> a kernel [in..., out...] (transpose, then reshape)."""
    out_f, in_f = shape
    return Entry(
        (key,), (tuple(shape),), (target,),
        lambda a: [a[0].T.reshape(nnx_shape)],
        lambda a: [a[0].reshape(in_f, out_f).T],
    )


def plain_entry(key: str, shape, target: Target, nnx_shape=None) -> Entry:
    """Same values; an optional reshape (e.g. a bias [H*d] <-> [H, d])."""
    shape = tuple(shape)
    nnx_shape = shape if nnx_shape is None else tuple(nnx_shape)
    return Entry(
        (key,), (shape,), (target,),
        lambda a: [a[0].reshape(nnx_shape)],
        lambda a: [a[0].reshape(shape)],
    )


def transposed_entry(key: str, shape, target: Target, axes: Sequence[int]) -> Entry:
    axes = tuple(axes)
    inverse = tuple(np.argsort(axes))
    return Entry(
        (key,), (tuple(shape),), (target,),
        lambda a: [np.transpose(a[0], axes)],
        lambda a: [np.transpose(a[0], inverse)],
    )


# ----------------------------------------------------------------------------------------------
# dtypes

NUMPY_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
DTYPE_ALIASES = {
    "fp32": "float32", "f32": "float32", "float32": "float32",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "f16": "float16", "float16": "float16",
}


def dtype_name(name: str) -> str:
    try:
        return DTYPE_ALIASES[str(name).lower()]
    except KeyError:
        raise ConvertError(f"unknown dtype {name!r}; expected one of bf16, fp16, fp32") from None


def np_dtype(name: str) -> np.dtype:
    return NUMPY_DTYPES[dtype_name(name)]


def promote(names: Sequence[str]) -> str:
    """The narrowest float dtype holding every one of `names` exactly (bf16 + fp16 -> fp32)."""
    names = {dtype_name(n) for n in names}
    if len(names) == 1:
        return names.pop()
    return "float32"


def is_float_name(name: str) -> bool:
    return str(name).lower() in DTYPE_ALIASES


# ----------------------------------------------------------------------------------------------
# sizes

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str | int) -> int:
    """'5GB' (10^9), '500MiB' (2^20), '1000' (bytes) -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise ConvertError(f"cannot read the size {text!r}; write e.g. 5GB, 500MB, 2GiB or a byte count")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConvertError(f"size {text!r} must be positive")
    return size


def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


# ----------------------------------------------------------------------------------------------
# output directories that never look complete before they are


class AtomicDir:
    """`with AtomicDir(dst) as tmp:` write into `tmp` (a sibling of `dst`); on success it is renamed
    to `dst` in one step, on error it is removed. An existing `dst` is refused unless `overwrite`."""

    def __init__(self, dst, overwrite: bool = False):
        import os
        import pathlib

        self.dst = pathlib.Path(dst).absolute()
        self.overwrite = overwrite
        self.tmp = self.dst.parent / f".{self.dst.name}.partial-{os.getpid()}"
        if self.dst.exists() and not overwrite:
            raise ConvertError(f"{self.dst} already exists; choose another --dst or pass --overwrite")

    def __enter__(self):
        import shutil

        self.dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        import os
        import shutil

        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.dst.exists():
            old = self.dst.parent / f".{self.dst.name}.old-{os.getpid()}"
            os.rename(self.dst, old)
        os.rename(self.tmp, self.dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False
