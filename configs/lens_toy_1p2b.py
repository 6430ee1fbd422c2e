"""Lens-Toy: the paper's 1.2B ablation scale (SPEC section 5), otherwise the recipe of lens_3p8b.

The paper gives only "1.2B"; we keep Lens's block design, head_dim 64 and RoPE split, and shrink
width and depth together: 18 heads x 64 = 1152 wide, 24 blocks. That is 36 * 1152^2 * 24 ~ 1.15B
in the blocks plus 21M in embedders and head: 1,165,148,288 parameters (`python -m lens_jax.info`).
The paper's toy used a 0.6B text encoder; ours keeps GPT-OSS-20B features (4 layers x 2880).
"""

import pathlib

from lens_jax.config import config_from_file


def get_config():
    c = config_from_file(pathlib.Path(__file__).with_name("lens_3p8b.py"))
    c.name = "lens_toy_1p2b"
    c.total_steps = 200_000
    c.model.num_layers = 24
    c.model.num_attention_heads = 18
    c.data.global_batch_size = 1024
    return c
