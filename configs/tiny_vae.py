"""configs/tiny.py on latents of a tiny FLUX.2-architecture VAE instead of pixels.

The VAE has the real block structure (down/up blocks, mid attention, quant convs, batch-norm
normalised 2x2-packed latents) at toy widths; its weights are seeded random unless
--config.codec.weights points at a converted flux2-vae directory of the same shape. 32x32 images
-> 8x8 VAE latents of 8 channels (4x down) -> 4x4 tokens of 32 channels.
"""

import pathlib

from lens_jax.config import config_from_file


def get_config():
    c = config_from_file(pathlib.Path(__file__).with_name("tiny.py"))
    c.name = "tiny_vae"
    c.codec.kind = "flux2"
    c.codec.vae = dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=8, norm_num_groups=8)
    c.codec.seed = 7
    c.model.in_channels = 32
    c.model.out_channels = 32
    return c
