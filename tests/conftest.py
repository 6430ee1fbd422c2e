"""Shared fixtures: tiny configs built in code (nothing is downloaded; datasets are generated)."""

from __future__ import annotations

import os
import pathlib

import pytest

# XLA's CPU backend spends most of a tiny test's time optimising code that then runs for
# milliseconds: compile at -O0 here (the library itself never sets this), and share compiled
# programs between the test process and the subprocesses it starts.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "lens_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

REPO = pathlib.Path(__file__).resolve().parents[1]


def micro_config(data_dir: str | os.PathLike, **overrides):
    """A few-thousand-parameter run: 32x32 images (16 tokens), 2 blocks, 2-layer encoder, batch 8."""
    from lens_jax.config import base_config, set_field, validate

    c = base_config()
    c.name = "micro"
    c.total_steps = 6
    c.log_every = 1
    c.checkpoint_every = 3
    c.sample_every = 0
    c.model.num_layers = 2
    c.model.num_attention_heads = 2
    c.model.attention_head_dim = 16
    c.model.axes_dims_rope = (4, 6, 6)
    c.model.mlp_hidden_dim = 64
    c.model.in_channels = 192
    c.model.out_channels = 192
    c.model.enc_hidden_dim = 32
    c.model.num_text_layers = 2
    c.model.init = "fan_in"  # non-zero outputs from step 0, so every parameter gets a gradient
    c.text_encoder.model = dict(
        vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, num_local_experts=2, num_experts_per_tok=1, intermediate_size=32, sliding_window=8,
        selected_layers=(0, 1), moe_impl="dense", dtype="float32",
    )
    c.codec.patch = 8
    c.data.dir = str(data_dir)
    c.data.num_train = 64
    c.data.num_eval = 8
    c.data.render_sizes = "32x32"
    c.data.buckets = "32x32"
    c.data.max_text_len = 32
    c.data.global_batch_size = 8
    c.data.worker_threads = 0
    c.data.prefetch = 0
    c.optimizer.lr = 1e-3
    c.sample.num_prompts = 2
    c.sample.steps = 2
    c.mesh.data = 1
    for k, v in overrides.items():
        set_field(c, k, v)
    return validate(c)


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes_data")
