"""Throughput of the dense captioner against a local OpenAI-compatible server with a fixed latency.

    python -m lens_jax.bench caption [--concurrency 1,8,32] [--images 200] [--latency 0.05]
    (the same as python -m lens_jax.bench.caption ...)

The server (:mod:`lens_jax.data.caption.fake_server`) runs in its own process (so it does not share
the captioner's GIL) and answers every request with a valid caption after ``latency`` seconds. The
captioner runs the real job: decoding and encoding each image, the openai client, validation, the
fsync'ed ledger. With latency L and concurrency C the ideal is C / L requests per second; the
reported ``efficiency`` is the measured rate over that ideal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_bench_images(folder: str | os.PathLike, n: int, size: int = 256) -> list[str]:
    """``n`` distinct JPEG images of ``size`` x ``size`` (gradients with a coloured block)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        img = np.empty((size, size, 3), np.uint8)
        img[..., 0] = ramp[None, :]
        img[..., 1] = ramp[:, None]
        img[..., 2] = (i * 37) % 256
        x, y = rng.integers(0, size // 2, 2)
        img[y:y + size // 4, x:x + size // 4] = rng.integers(0, 256, 3, dtype=np.uint8)
        p = folder / f"img_{i:05d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(str(p))
    return paths


class _ServerProcess:
    def __init__(self, latency_s: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lens_jax.data.caption.fake_server", "--latency", str(latency_s)],
            stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http://"):
            self.stop()
            raise RuntimeError(f"fake server did not start (got {line!r})")
        self.base_url = line

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def bench_caption(concurrency: int, n_images: int, latency_s: float, *, image_size: int = 256,
                  max_side: int = 768, fsync: bool = True, images_dir: str | None = None,
                  server: str = "process", progress: bool = False) -> dict:
    """Captions ``n_images`` at ``concurrency`` against a server answering after ``latency_s``.

    ``server``: "process" (a separate process, the default) or "thread" (in this process).
    ``images_dir``: reuse images written by :func:`write_bench_images` (else made in a temp dir).
    Returns requests/s, images/s and the ideal rate ``concurrency / latency_s``.
    """
    from lens_jax.data.caption import CaptionConfig, run_captioner

    tmp = Path(tempfile.mkdtemp(prefix="lens_bench_caption-"))
    srv = None
    try:
        if images_dir is None:
            images_dir = str(tmp / "images")
            write_bench_images(images_dir, n_images, image_size)
        if server == "process":
            srv = _ServerProcess(latency_s)
        elif server == "thread":
            from lens_jax.data.caption.fake_server import FakeOpenAI

            srv = FakeOpenAI(latency=latency_s)
        else:
            raise ValueError(f"server must be 'process' or 'thread', got {server!r}")
        cfg = CaptionConfig(images=images_dir, out=str(tmp / "out"), model="bench", base_url=srv.base_url,
                            concurrency=concurrency, max_side=max_side, fsync=fsync, progress=progress,
                            timeout=max(10.0, 20 * latency_s), limit=n_images)
        t0 = time.perf_counter()
        summary = run_captioner(cfg)
        wall = time.perf_counter() - t0
    finally:
        if srv is not None:
            srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    run = summary["run"]
    ideal = concurrency / latency_s if latency_s > 0 else float("inf")
    return {
        "concurrency": concurrency,
        "images": run["done"] + run["failed"],
        "done": run["done"],
        "latency_s": latency_s,
        "requests": run["requests"],
        "elapsed_s": run["elapsed_s"],
        "wall_s": round(wall, 3),
        "requests_per_s": run["requests_per_s"],
        "images_per_s": run["images_per_s"],
        "ideal_requests_per_s": round(ideal, 1),
        "efficiency": round(run["requests_per_s"] / ideal, 3) if ideal not in (0, float("inf")) else None,
        "image_size": image_size,
        "fsync": fsync,
        "server": server,
        "cpu_count": os.cpu_count(),
    }


def main(argv=None, prog: str = "python -m lens_jax.bench caption") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated list")
    p.add_argument("--images", type=int, default=200, help="images per measurement")
    p.add_argument("--latency", type=float, default=0.05, help="server latency per request, seconds")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--max-side", type=int, default=768)
    p.add_argument("--no-fsync", dest="fsync", action="store_false")
    p.add_argument("--server", default="process", choices=("process", "thread"))
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    with tempfile.TemporaryDirectory(prefix="lens_bench_caption_images-") as images:
        write_bench_images(images, args.images, args.image_size)
        results = []
        for c in levels:
            r = bench_caption(c, args.images, args.latency, image_size=args.image_size, max_side=args.max_side,
                              fsync=args.fsync, images_dir=images, server=args.server)
            results.append(r)
            print(json.dumps(r), flush=True)
    print(json.dumps({"concurrency": levels, "requests_per_s": [r["requests_per_s"] for r in results],
                      "images_per_s": [r["images_per_s"] for r in results]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
