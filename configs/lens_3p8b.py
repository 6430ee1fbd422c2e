"""Lens at the official shape: 48 double-stream blocks, 24 x 64 heads, 4,104,225,152 DiT parameters.

Stage 1 of the paper's recipe (SPEC section 5): 512^2 only, global batch 3072, AdamW (0.9, 0.999),
constant LR 2e-4, grad clip 1.0, logit-normal mu 1.06, bf16 compute with float32 master weights.
Text features from GPT-OSS-20B (set --config.text_encoder.weights and .tokenizer to converted folders).
"""

from lens_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "lens_3p8b"
    c.total_steps = 400_000
    c.log_every = 50
    c.checkpoint_every = 2000
    c.sample_every = 10_000

    c.model.num_layers = 48
    c.model.num_attention_heads = 24
    c.model.attention_head_dim = 64
    c.model.axes_dims_rope = (8, 28, 28)
    c.model.in_channels = 128
    c.model.out_channels = 128
    c.model.enc_hidden_dim = 2880
    c.model.num_text_layers = 4
    c.model.dtype = "bfloat16"
    c.model.remat = "dots_no_batch"
    c.model.attention_impl = "xla"  # 'cudnn' on NVIDIA GPUs

    c.text_encoder.model = dict(selected_layers=(5, 11, 17, 23), dtype="bfloat16", moe_impl="blocked")
    c.text_encoder.offset = 97

    c.codec.kind = "flux2"

    c.data.source = "tfds"
    c.data.buckets = "512x512"
    c.data.caption = "dense"
    c.data.max_text_len = 512
    c.data.global_batch_size = 3072

    c.optimizer.lr = 2e-4
    c.optimizer.schedule = "constant"
    c.optimizer.grad_clip = 1.0

    c.loss.mu_at_low = 1.06
    c.loss.mu_at_high = 1.06

    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
