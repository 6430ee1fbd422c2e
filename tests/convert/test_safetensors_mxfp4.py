"""The numpy safetensors reader/writer against the `safetensors` package, and MXFP4 against transformers."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from lens_jax.convert import mxfp4
from lens_jax.convert.common import ConvertError, parse_size
from lens_jax.convert.safetensors_io import (
    PlannedTensor,
    SafetensorsCheckpoint,
    SafetensorsFile,
    SafetensorsWriter,
    load_file,
    save_file,
)


def _tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "a.weight": rng.standard_normal((5, 7)).astype(np.float32),
        "b.bf16": rng.standard_normal((3, 4, 2)).astype(ml_dtypes.bfloat16),
        "c.fp16": rng.standard_normal((9,)).astype(np.float16),
        "d.u8": rng.integers(0, 256, (4, 16), dtype=np.uint8),
        "e.scalar": np.array(3.5, np.float32),
        "f.empty": np.zeros((0, 3), np.float32),
    }


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_roundtrip_with_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    ours = _tensors()
    save_file(tmp_path / "ours.safetensors", ours)
    theirs = st.load_file(str(tmp_path / "ours.safetensors"))  # the reference parser accepts our files
    assert set(theirs) == set(ours)
    for k in ours:
        assert _same(theirs[k], ours[k]), k
    st.save_file({k: v for k, v in ours.items()}, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    back = load_file(tmp_path / "theirs.safetensors")  # and we read theirs
    for k in ours:
        assert _same(back[k], ours[k]), k
    f = SafetensorsFile(tmp_path / "theirs.safetensors")
    assert f.metadata == {"format": "pt"}
    assert f.read("b.bf16", np.float32).dtype == np.float32
    f.close()


def test_sharded_writer_index_and_reader(tmp_path):
    ts = _tensors(1)
    plan = [PlannedTensor(k, v.dtype, v.shape) for k, v in ts.items()]
    w = SafetensorsWriter(tmp_path, "model", plan, max_shard_size=64)
    for k in reversed(list(ts)):  # any order
        w.write(k, ts[k])
    names = w.close()
    assert "model.safetensors.index.json" in names and len(names) > 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ts)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in ts.values())
    with SafetensorsCheckpoint(tmp_path, prefer=("model",)) as r:
        assert sorted(r.keys()) == sorted(ts)
        for k, v in ts.items():
            assert _same(r.read(k), v)
    # an index naming a tensor its shard does not hold is an error naming both
    index["weight_map"]["a.weight"] = index["weight_map"]["d.u8"] if index["weight_map"]["d.u8"] != index["weight_map"]["a.weight"] \
        else names[0]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConvertError, match="a.weight"):
        SafetensorsCheckpoint(tmp_path)


def test_writer_refuses_wrong_dtype_and_unwritten(tmp_path):
    w = SafetensorsWriter(tmp_path, "x", [PlannedTensor("t", np.dtype(np.float32), (2,))], 1 << 30)
    with pytest.raises(ConvertError, match="planned as float32"):
        w.write("t", np.zeros(2, np.float16))
    with pytest.raises(ConvertError, match="never written"):
        w.close()


def test_truncated_file_is_named(tmp_path):
    save_file(tmp_path / "t.safetensors", {"big": np.ones((100, 100), np.float32)})
    raw = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-100])
    with pytest.raises(ConvertError, match="'big'.*truncated"):
        SafetensorsFile(tmp_path / "t.safetensors")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1234") == 1234
    with pytest.raises(ConvertError):
        parse_size("five")


# ----------------------------------------------------------------------------------------------
# MXFP4


def _random_mxfp4(shape_out, n_in, seed=0, lo=110, hi=140):
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, shape_out + (n_in // 32, 16), dtype=np.uint8)
    scales = rng.integers(lo, hi, shape_out + (n_in // 32,), dtype=np.uint8)
    return blocks, scales


def test_dequantize_matches_transformers_bitwise():
    torch = pytest.importorskip("torch")
    conv = pytest.importorskip("transformers.integrations.mxfp4").convert_moe_packed_tensors
    blocks, scales = _random_mxfp4((3, 6), 64)
    scales[0, 0, 0] = 0  # 2^-127: float32 subnormals
    scales[1, 2, 1] = 1
    blocks[2, 3, 0] = 0x88  # two -0 nibbles
    ours = mxfp4.dequantize(blocks, scales)  # [E, out, in]
    ref = conv(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32).numpy()  # [E, in, out]
    assert _same(np.ascontiguousarray(ours.transpose(0, 2, 1)), ref)
    assert np.signbit(ours[2, 3, 0]) and ours[2, 3, 0] == 0


def test_quantize_with_hint_restores_the_bytes():
    blocks, scales = _random_mxfp4((4, 5), 96, seed=3)
    blocks[0, 0] = 0  # an all-zero group: its scale is arbitrary, only the hint can restore it
    blocks[1, 1, 1] = 0x88  # -0 nibbles survive through the sign bit
    w = mxfp4.dequantize(blocks, scales)
    b2, s2 = mxfp4.quantize(w, scales)
    assert np.array_equal(b2, blocks) and np.array_equal(s2, scales)
    # through bf16 (how converted directories store the experts) nothing changes either
    b3, s3 = mxfp4.quantize(w.astype(ml_dtypes.bfloat16), scales)
    assert np.array_equal(b3, blocks) and np.array_equal(s3, scales)
    # without the hint the canonical scales still reproduce every value exactly
    b4, s4 = mxfp4.quantize(w)
    assert _same(mxfp4.dequantize(b4, s4), w)
    # a wrong hint falls back to the canonical scale per group, still exact
    b5, s5 = mxfp4.quantize(w, np.full_like(scales, 100))
    assert _same(mxfp4.dequantize(b5, s5), w)


def test_quantize_general_values_round_to_nearest():
    """Canonical (OCP) scale per group; each value goes to the nearest representable one."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((6, 64)) * np.exp(rng.standard_normal((6, 1)))).astype(np.float32)
    b, s = mxfp4.quantize(w)
    back = mxfp4.dequantize(b, s).reshape(6, 2, 32)
    e = s.astype(np.int32) - 127
    amax = np.abs(w).reshape(6, 2, 32).max(-1)
    assert np.all((amax / np.ldexp(1.0, e) >= 4) & (amax / np.ldexp(1.0, e) < 8))  # floor(log2 amax) - 2
    grid = np.ldexp(mxfp4.FP4_VALUES[None, None, :].astype(np.float64), e[..., None])  # [6, 2, 16]
    dist = np.abs(w.reshape(6, 2, 32)[..., None] - grid[:, :, None, :])  # [6, 2, 32, 16]
    best = dist.min(-1)
    assert np.allclose(np.abs(back - w.reshape(6, 2, 32)), best, rtol=0, atol=1e-7)


def test_pair_shapes_and_errors():
    p = mxfp4.Pair("x", "x_blocks", "x_scales", transpose=True)
    assert p.stored_shapes((2, 64, 96)) == ((2, 96, 2, 16), (2, 96, 2))
    with pytest.raises(ConvertError, match="multiple of 32"):
        p.stored_shapes((2, 40, 96))
    with pytest.raises(ConvertError, match="x_blocks"):
        p.decode(np.zeros((2, 3, 16), np.uint8), np.zeros((2, 4), np.uint8))
