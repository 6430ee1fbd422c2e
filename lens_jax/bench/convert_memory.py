"""Peak host memory of `lens_jax.convert import` / `export` on a synthetic official-layout Lens DiT.

    python -m lens_jax.bench convert-memory [--layers 8] [--dtype bf16] [--workdir /tmp/lens_mem]

Writes a lens-dit checkpoint with the real widths (24 heads x 64, enc 2880, 4 text layers, 128
channels) and `--layers` blocks of random values, tensor by tensor with lens_jax's own safetensors
writer (sharded, with an index), then runs import and export as separate processes under
/usr/bin/time -v and prints their maximum resident set sizes next to the checkpoint size and the
baseline of a process that only imports the converter and builds the abstract model. Minutes and
gigabytes: a benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]


def write_synthetic(folder: pathlib.Path, layers: int, dtype: str) -> int:
    from lens_jax.convert import keys_lens_dit
    from lens_jax.convert.common import np_dtype
    from lens_jax.convert.safetensors_io import PlannedTensor, SafetensorsWriter

    config = {"patch_size": 2, "in_channels": 128, "out_channels": 32, "num_layers": layers, "attention_head_dim": 64,
              "num_attention_heads": 24, "enc_hidden_dim": 2880, "axes_dims_rope": [8, 28, 28],
              "selected_layer_index": [5, 11, 17, 23]}
    cfg = keys_lens_dit.config_from_official(config)
    dt = np_dtype(dtype)
    plan = [PlannedTensor(k, dt, s) for e in keys_lens_dit.entries(cfg) for k, s in zip(e.keys, e.shapes)]
    folder.mkdir(parents=True)
    w = SafetensorsWriter(folder, "diffusion_pytorch_model", plan, max_shard_size=500 * 10**6)
    rng = np.random.default_rng(0)
    for t in plan:
        w.write(t.key, (rng.standard_normal(t.shape, np.float32) * 0.02).astype(dt))
    w.close()
    (folder / "config.json").write_text(json.dumps(config))
    return sum(t.nbytes for t in plan)


def peak_rss_mb(cmd: list[str]) -> tuple[float, str]:
    proc = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return kb / 1024, proc.stdout.strip()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lens_jax.bench convert-memory")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--workdir", default="/tmp/lens_mem")
    args = ap.parse_args(argv)
    root = pathlib.Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    size = write_synthetic(root / "transformer", args.layers, args.dtype)
    print(f"synthetic lens-dit: {args.layers} blocks, {args.dtype}, {size / 2**20:.0f} MiB of tensors")
    py = sys.executable
    base, _ = peak_rss_mb([py, "-c", (
        "import json; from lens_jax.convert import kinds, keys_lens_dit; import lens_jax.convert.importer;"
        f"k = kinds.get_kind('lens-dit'); c = json.load(open('{root}/transformer/config.json'));"
        "cfg = keys_lens_dit.config_from_official(c); k.abstract(kinds.Spec('lens-dit', 'official', cfg, []))")])
    imp, out = peak_rss_mb([py, "-m", "lens_jax.convert", "import", "--kind", "lens-dit", "--src", str(root / "transformer"),
                            "--dst", str(root / "converted")])
    print(out)
    exp, out = peak_rss_mb([py, "-m", "lens_jax.convert", "export", "--src", str(root / "converted"),
                            "--dst", str(root / "exported"), "--max-shard-size", "500MB"])
    print(out)
    largest = args.layers * 1536 * 9216 * (2 if args.dtype == "bf16" else 4) / 2**20  # blocks.img_mod.kernel
    print(f"baseline (imports + abstract model): {base:.0f} MiB peak RSS")
    print(f"largest stacked parameter (blocks.img_mod.kernel): {largest:.0f} MiB")
    print(f"import: {imp:.0f} MiB peak RSS = baseline + {imp - base:.0f} MiB for {size / 2**20:.0f} MiB of output")
    print(f"export: {exp:.0f} MiB peak RSS = baseline + {exp - base:.0f} MiB")


if __name__ == "__main__":
    main()
