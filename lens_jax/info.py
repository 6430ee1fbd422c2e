"""python -m lens_jax.info --config CONFIG [--config.FIELD=VALUE]: sizes and FLOPs, without allocating."""

from __future__ import annotations

import json
import sys


def model_info(cfg) -> dict:
    from flax import nnx

    from lens_jax.budget.flops import dit_forward_flops, dit_train_flops
    from lens_jax.models.abstract import param_count
    from lens_jax.models.codec import codec_geometry
    from lens_jax.models.dit import DiTConfig, LensDiT
    from lens_jax.models.gpt_oss import GptOssEncoder
    from lens_jax.text.encoder import encoder_config

    dit_cfg = DiTConfig.from_dict(cfg.model)
    enc_cfg = encoder_config(cfg.text_encoder)
    downsample, channels = codec_geometry(cfg.codec)
    text_tokens = int(cfg.data.max_text_len) - int(cfg.text_encoder.offset)
    buckets = {}
    for b in cfg.data.buckets.split(","):
        w, h = (int(v) for v in b.lower().strip().split("x"))
        img_tokens = (w // downsample) * (h // downsample)
        buckets[f"{w}x{h}"] = {
            "image_tokens": img_tokens,
            "text_tokens": text_tokens,
            "train_flops_per_sample": dit_train_flops(dit_cfg, img_tokens, text_tokens),
            "forward_flops_per_sample": dit_forward_flops(dit_cfg, img_tokens, text_tokens),
        }
    return {
        "name": cfg.name,
        "dit_params": param_count(lambda: LensDiT(dit_cfg, rngs=nnx.Rngs(0))),
        "text_encoder_params": param_count(lambda: GptOssEncoder(enc_cfg, rngs=nnx.Rngs(0))),
        "latent_channels": channels,
        "pixels_per_token": downsample,
        "buckets": buckets,
    }


def main(argv):
    from absl import flags

    from lens_jax import config as config_lib

    print(json.dumps(model_info(config_lib.validate(flags.FLAGS.config)), indent=2))


if __name__ == "__main__":
    from absl import app
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
    flags_module = __import__("absl.flags", fromlist=["flags"])
    flags_module.mark_flags_as_required(["config"])
    sys.exit(app.run(main))
