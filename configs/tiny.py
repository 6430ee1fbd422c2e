"""Tiny Lens: trains on 2 CPU cores in minutes on the embedded procedural shapes dataset.

Pixel space (the `pixel` codec folds 8x8x3 pixels into 192 channels: 64x64 images are 8x8 = 64
tokens) with a GPT-OSS-shaped encoder of seeded random weights over the dataset's word tokenizer.
"""

from lens_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "tiny"
    c.seed = 0
    c.total_steps = 2000
    c.log_every = 25
    c.checkpoint_every = 500
    c.sample_every = 1000

    c.model.num_layers = 4
    c.model.num_attention_heads = 4
    c.model.attention_head_dim = 32
    c.model.axes_dims_rope = (8, 12, 12)
    c.model.in_channels = 192
    c.model.out_channels = 192
    c.model.enc_hidden_dim = 64
    c.model.num_text_layers = 2
    c.model.mlp_hidden_dim = 344  # ~8/3 x 128, divisible by tensor-parallel sizes
    c.model.dtype = "float32"  # bf16 gains nothing on CPU

    c.text_encoder.model = dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=64,
        sliding_window=16,
        selected_layers=(1, 3),
        moe_impl="dense", dtype="float32",
    )
    c.text_encoder.seed = 1234

    c.codec.kind = "pixel"
    c.codec.patch = 8

    c.data.num_train = 20000
    c.data.render_sizes = "64x64"
    c.data.buckets = "64x64"
    c.data.caption = "mix"
    c.data.dense_ratio = 0.5
    c.data.max_text_len = 128
    c.data.global_batch_size = 32

    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "cosine"
    c.optimizer.grad_clip = 1.0
    c.optimizer.ema_decay = 0.0

    c.loss.mu_at_low = 0.0  # 64 tokens: pixel space needs no high-noise shift
    c.loss.mu_at_high = 0.0

    c.sample.num_prompts = 6
    c.sample.steps = 20
    c.sample.guidance = 3.0
    return c
