"""safetensors with numpy only: header parsing, memory-mapped reads, a sharded writer with an index.

Format: an 8-byte little-endian header length N, N bytes of JSON
`{key: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`
(padded with spaces to a multiple of 8), then the raw little-endian tensor bytes; offsets are
relative to the end of the header. bfloat16 and float8 come from ml_dtypes.

Reads map the file and copy one tensor out at a time; the pages of a tensor are dropped from the
process (madvise DONTNEED) once copied, so reading a checkpoint tensor by tensor keeps the resident
memory near one tensor however large the files are.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import pathlib
import struct
import sys
from typing import Iterable, Sequence

import ml_dtypes
import numpy as np

from lens_jax.convert.common import ConvertError, fmt_shape

ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
# numpy dtype names used in lens_jax.json and error messages
DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype(np.float16): "float16"}

_MAX_HEADER = 100 * 2**20
_CHUNK = 2**30
_PAGE = mmap.PAGESIZE

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("lens_jax.convert.safetensors_io assumes a little-endian host")


def dtype_to_st(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype not in ST_NAMES:
        raise ConvertError(f"dtype {dtype} has no safetensors name")
    return ST_NAMES[dtype]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int
    file: pathlib.Path

    @property
    def st_dtype(self) -> str:
        return ST_NAMES[self.dtype]


class SafetensorsFile:
    """One .safetensors file, memory-mapped read-only."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ConvertError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise ConvertError(f"{self.path}: not a safetensors file (header length {n} for a {size}-byte file)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise ConvertError(f"{self.path}: unreadable safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        data_start = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for key, info in header.items():
            st = info.get("dtype")
            if st not in ST_DTYPES:
                raise ConvertError(f"{self.path}: tensor {key!r} has unsupported dtype {st!r}")
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
            nbytes = math.prod(shape) * ST_DTYPES[st].itemsize
            if end - begin != nbytes or begin < 0 or data_start + end > size:
                raise ConvertError(
                    f"{self.path}: tensor {key!r} ({st} {fmt_shape(shape)}) has data offsets [{begin}, {end}] that do not "
                    f"fit its {nbytes} bytes in the file ({size - data_start} data bytes): truncated or corrupt file"
                )
            self.tensors[key] = TensorInfo(key, ST_DTYPES[st], shape, data_start + begin, data_start + end, self.path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ) if size > 0 else None

    def read(self, key: str, dtype=None) -> np.ndarray:
        """A fresh (writable, owned) copy of tensor `key`, optionally cast to `dtype`."""
        info = self.tensors[key]
        out_dtype = info.dtype if dtype is None else np.dtype(dtype)
        count = math.prod(info.shape)
        if count == 0:
            return np.zeros(info.shape, out_dtype)
        view = np.frombuffer(self._mm, dtype=info.dtype, count=count, offset=info.begin).reshape(info.shape)
        try:
            out = view.astype(out_dtype, copy=True)
        finally:
            del view
        self.drop(info.begin, info.end)
        return out

    def drop(self, begin: int, end: int) -> None:
        """Release the mapped pages of [begin, end) from this process (they stay in the page cache)."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = (begin // _PAGE) * _PAGE
        stop = min(len(self._mm), -(-end // _PAGE) * _PAGE)
        if stop > start:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
            except (OSError, ValueError):  # pragma: no cover - advisory only
                pass

    def close(self):
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover
            pass


class SafetensorsCheckpoint:
    """Every tensor of a checkpoint: one file, a folder of files, or a folder with an index json.

    `prefer` lists file base names (e.g. 'model', 'diffusion_pytorch_model') used to pick among
    several index files or weight files in one folder.
    """

    def __init__(self, path: str | os.PathLike, prefer: Sequence[str] = ()):
        path = pathlib.Path(path)
        self.files: dict[pathlib.Path, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        if path.is_file():
            self._add_files([path])
            self.root = path.parent
            return
        if not path.is_dir():
            raise ConvertError(f"{path} does not exist")
        self.root = path
        indexes = sorted(path.glob("*.safetensors.index.json"))
        preferred = [path / f"{b}.safetensors.index.json" for b in prefer]
        index = next((p for p in preferred if p.exists()), None)
        if index is None and len(indexes) == 1:
            index = indexes[0]
        if index is None and len(indexes) > 1:
            raise ConvertError(f"{path} holds several index files {[p.name for p in indexes]}; point --src at one file set")
        if index is not None:
            self._from_index(index)
            return
        weights = [path / f"{b}.safetensors" for b in prefer if (path / f"{b}.safetensors").exists()]
        files = weights[:1] or sorted(path.glob("*.safetensors"))
        if not files:
            raise ConvertError(f"no .safetensors file in {path}")
        self._add_files(files)

    def _add_files(self, files: Iterable[pathlib.Path]):
        for p in files:
            f = SafetensorsFile(p)
            self.files[p] = f
            for key in f.tensors:
                if key in self.where:
                    raise ConvertError(f"tensor {key!r} is stored twice: in {self.where[key].path.name} and {p.name}")
                self.where[key] = f

    def _from_index(self, index: pathlib.Path):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ConvertError(f"{index}: not a safetensors index json ({e})") from None
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (index.parent / name).exists():
                raise ConvertError(f"{index.name} lists shard {name}, which is missing from {index.parent}")
        self._add_files([index.parent / n for n in names])
        for key, name in weight_map.items():
            f = self.where.get(key)
            if f is None or f.path.name != name:
                raise ConvertError(f"{index.name} maps {key!r} to {name}, but that file does not hold it")
        extra = sorted(set(self.where) - set(weight_map))
        if extra:
            raise ConvertError(f"{index.name} does not list tensor(s) {extra[:5]} found in its shards")

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def info(self, key: str) -> TensorInfo:
        return self.where[key].tensors[key]

    def read(self, key: str, dtype=None) -> np.ndarray:
        return self.where[key].read(key, dtype)

    @property
    def total_bytes(self) -> int:
        return sum(i.end - i.begin for f in self.files.values() for i in f.tensors.values())

    def close(self):
        for f in self.files.values():
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# ----------------------------------------------------------------------------------------------
# writing


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    key: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Greedy, in order: a new shard starts when the next tensor would push this one past the limit."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header_bytes(tensors: Sequence[PlannedTensor], metadata: dict) -> bytes:
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.key] = {"dtype": dtype_to_st(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Pre-plans every file (headers first), then takes tensors in any order with `write(key, array)`.

    One file `{base}.safetensors` when everything fits in `max_shard_size`, else
    `{base}-00001-of-0000N.safetensors` ... plus `{base}.safetensors.index.json`.
    """

    def __init__(self, folder, base: str, tensors: Sequence[PlannedTensor], max_shard_size: int,
                 metadata: dict | None = None):
        self.folder = pathlib.Path(folder)
        self.base = base
        keys = [t.key for t in tensors]
        if len(set(keys)) != len(keys):
            raise ConvertError("duplicate keys in the export plan")
        shards = plan_shards(tensors, max_shard_size)
        n = len(shards)
        self.names = [f"{base}.safetensors"] if n == 1 else [f"{base}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.loc: dict[str, tuple[int, int, PlannedTensor]] = {}
        self.fds: list[int] = []
        self.weight_map: dict[str, str] = {}
        self.total = 0
        for name, shard in zip(self.names, shards):
            head = _header_bytes(shard, {"format": "pt"} if metadata is None else metadata)
            fd = os.open(self.folder / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds.append(fd)
            os.pwrite(fd, head, 0)
            offset = len(head)
            for t in shard:
                self.loc[t.key] = (fd, offset, t)
                self.weight_map[t.key] = name
                offset += t.nbytes
                self.total += t.nbytes
            os.ftruncate(fd, offset)
        self.written: set[str] = set()

    def write(self, key: str, array: np.ndarray) -> None:
        if key not in self.loc:
            raise ConvertError(f"export: {key!r} is not in the plan")
        fd, offset, t = self.loc[key]
        array = np.asarray(array)
        if array.dtype != np.dtype(t.dtype) or tuple(array.shape) != tuple(t.shape):
            raise ConvertError(
                f"export: {key!r} planned as {np.dtype(t.dtype)} {fmt_shape(t.shape)}, got {array.dtype} {fmt_shape(array.shape)}"
            )
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        pos = 0
        while pos < len(data):
            n = os.pwrite(fd, data[pos:pos + _CHUNK], offset + pos)
            if n <= 0:  # pragma: no cover
                raise OSError(f"short write of {key!r}")
            pos += n
        self.written.add(key)

    def close(self) -> list[str]:
        """Check every tensor was written, flush, write the index (if sharded); returns the file names."""
        missing = [k for k in self.loc if k not in self.written]
        for fd in self.fds:
            os.fsync(fd)
            os.close(fd)
        self.fds = []
        if missing:
            raise ConvertError(f"export: {len(missing)} tensor(s) never written, e.g. {missing[:3]}")
        names = list(self.names)
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
            name = f"{self.base}.safetensors.index.json"
            (self.folder / name).write_text(json.dumps(index, indent=2) + "\n")
            names.append(name)
        return names

    def abort(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def save_file(path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write a dict of numpy arrays as one safetensors file (small files: tests, sidecars)."""
    path = pathlib.Path(path)
    plan = [PlannedTensor(k, np.asarray(v).dtype, tuple(np.shape(v))) for k, v in tensors.items()]
    w = SafetensorsWriter(path.parent, path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name,
                          plan, max_shard_size=2**62, metadata=metadata)
    for k, v in tensors.items():
        w.write(k, np.asarray(v))
    w.close()


def load_file(path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(path)
    try:
        return {k: f.read(k) for k in f.tensors}
    finally:
        f.close()
