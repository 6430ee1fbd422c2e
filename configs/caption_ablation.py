"""The caption-density ablation's toy (python -m lens_jax.budget ablate-captions).

configs/tiny.py scaled to keep the real model's proportions (../shared/DESIGN.md, "toy-scale
reproduction"): 64x64 images in the 4x4x3 pixel codec are 16x16 = 256 image tokens; captions are
tokenised by the word tokenizer of the procedural grammar, so a dense caption is ~100 tokens (padded
to 128) and a short one ~9 (padded to 16). Scenes are the dataset's full default (1-3 kinds of
object, counts up to 4, three sizes) narrowed to what ~16K training images can teach, without
rendered words; all six ShapesEval tasks stay trainable. The ablation overrides data.caption and data.max_text_len per arm and total_steps from the
FLOPs budget.
"""

import pathlib

from lens_jax.config import config_from_file


def get_config():
    c = config_from_file(pathlib.Path(__file__).with_name("tiny.py"))
    c.name = "caption_ablation"
    c.log_every = 10
    c.sample_every = 0
    c.keep_checkpoints = 8
    c.data.num_train = 20000
    c.data.num_eval = 64
    # Up to two kinds of object, up to three copies, medium and large: at this budget (~16K images per arm)
    # the full default world (three kinds, small objects) left even the dense arm at fragments (seen).
    c.data.scene = dict(text_prob=0.0, max_groups=2, max_count=3, max_objects=4, sizes=("medium", "large"))
    c.data.render_sizes = "64x64"
    c.data.buckets = "64x64"
    c.data.caption = "dense"
    c.data.max_text_len = 128
    c.data.global_batch_size = 16  # more, smaller steps: this budget buys ~1-2K steps
    c.optimizer.warmup_steps = 50
    # checkpoints come as early as ~250 steps: without warmup an EMA of decay 0.999 would still be 78% the
    # (zero-output) initial weights there, and its samples pure noise (seen)
    c.optimizer.ema_warmup = 10.0
    return c
