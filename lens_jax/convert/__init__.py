"""Checkpoint conversion between the official PyTorch layouts and lens_jax (Orbax) directories.

    python -m lens_jax.convert import --kind {lens-dit,gpt-oss,flux2-vae} --src PATH --dst DIR
    python -m lens_jax.convert export --kind ... --src DIR --dst PATH [--dtype bf16|fp16|fp32] [--mxfp4]
    python -m lens_jax.convert verify --kind ... --src TORCH_PATH [--dst FLAX_DIR]

Python API: `import_checkpoint`, `export_checkpoint`, `load_converted` (a converted directory straight
into a mesh), `verify`. Nothing here imports torch except `verify` (and only when called).
"""

from __future__ import annotations

from lens_jax.convert.common import ConvertError

__all__ = ["ConvertError", "import_checkpoint", "export_checkpoint", "load_converted", "verify", "KINDS"]

KINDS = ("lens-dit", "gpt-oss", "flux2-vae")


def import_checkpoint(*args, **kwargs):
    from lens_jax.convert.importer import import_checkpoint as f

    return f(*args, **kwargs)


def export_checkpoint(*args, **kwargs):
    from lens_jax.convert.exporter import export_checkpoint as f

    return f(*args, **kwargs)


def load_converted(*args, **kwargs):
    from lens_jax.convert.checkpoint_io import load_converted as f

    return f(*args, **kwargs)


def verify(*args, **kwargs):
    from lens_jax.convert.verify import verify as f

    return f(*args, **kwargs)
