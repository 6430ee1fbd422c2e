"""Lens-Toy: the paper's 1.2B ablation scale (SPEC section 5).

The paper gives only "1.2B"; we keep Lens's block design, head_dim 64 and RoPE split, and shrink
width and depth together: 18 heads x 64 = 1152 wide, 24 blocks. That is 36 * 1152^2 * 24 ~ 1.15B
in the blocks plus 21M in embedders and head: 1,165,148,288 parameters (`python -m lens_jax.info`).
The paper's toy used a 0.6B text encoder; ours keeps GPT-OSS-20B features (4 layers x 2880).
"""

from lens_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "lens_toy_1p2b"
    c.total_steps = 200_000
    c.log_every = 50
    c.checkpoint_every = 2000

    c.model.num_layers = 24
    c.model.num_attention_heads = 18
    c.model.attention_head_dim = 64
    c.model.axes_dims_rope = (8, 28, 28)
    c.model.in_channels = 128
    c.model.out_channels = 128
    c.model.enc_hidden_dim = 2880
    c.model.num_text_layers = 4
    c.model.dtype = "bfloat16"
    c.model.remat = "dots_no_batch"

    c.text_encoder.model = dict(selected_layers=(5, 11, 17, 23), dtype="bfloat16", moe_impl="blocked")
    c.text_encoder.offset = 97

    c.codec.kind = "flux2"
    c.data.source = "tfds"
    c.data.buckets = "512x512"
    c.data.caption = "dense"
    c.data.max_text_len = 512
    c.data.global_batch_size = 1024
    c.optimizer.lr = 2e-4
    c.loss.mu_at_low = 1.06
    c.loss.mu_at_high = 1.06
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
