"""Tiny Lens: trains on 2 CPU cores in minutes on the embedded procedural shapes dataset.

Pixel space: the `pixel` codec folds 4x4x3 pixels into 48 channels, so 32x32 images are 8x8 = 64
tokens. The token width must stay below the model width (128): a velocity is a linear read-out of
the hidden state, so with 8x8x3 = 192 channels the noise outside a 128-dim subspace could never be
removed and samples stay grainy. Text: a GPT-OSS-shaped encoder with seeded random weights over the
dataset's word tokenizer.
"""

from lens_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "tiny"
    c.seed = 0
    c.total_steps = 2000
    c.log_every = 25
    c.checkpoint_every = 500
    c.sample_every = 500

    c.model.num_layers = 4
    c.model.num_attention_heads = 4
    c.model.attention_head_dim = 32
    c.model.axes_dims_rope = (8, 12, 12)
    c.model.in_channels = 48
    c.model.out_channels = 48
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
    c.codec.patch = 4

    c.data.num_train = 20000
    # Simple scenes for a 10-minute CPU run: at most two medium/large objects, no counts, no words,
    # so a short caption names everything in the picture.
    c.data.scene = dict(max_groups=2, count_prob=0.0, text_prob=0.0, sizes=("medium", "large"))
    c.data.render_sizes = "32x32"
    c.data.buckets = "32x32"
    # Short (alt-text) captions keep the demo's joint sequence at 64 + 16 tokens, ~3x cheaper per step
    # on CPU than dense captions padded to 128; the caption-density ablation trains on dense ones.
    c.data.caption = "short"
    c.data.dense_ratio = 0.5
    c.data.max_text_len = 16
    c.data.global_batch_size = 32

    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "cosine"
    c.optimizer.grad_clip = 1.0
    c.optimizer.ema_decay = 0.999  # samples come from the EMA weights: crisper shapes at this short schedule

    c.loss.mu_at_low = 0.0  # 64 tokens: pixel space needs no high-noise shift
    c.loss.mu_at_high = 0.0

    c.sample.num_prompts = 6
    c.sample.steps = 20
    c.sample.guidance = 5.0  # Lens's default; clearly better prompt adherence than 2-3 here
    return c
