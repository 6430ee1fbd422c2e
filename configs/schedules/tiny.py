"""The tiny CPU demo run (configs/tiny.py) as a schedule: 2000 steps of global batch 32 at 32x32.

The JAX training loop pads every caption to data.max_text_len (16 tokens for the tiny config, no
chat template, offset 0), so text_pad_to = 16 is what the loop computes (and what its logged MFU counts).
"""


def get_schedule():
    return {
        "name": "tiny",
        "description": "configs/tiny.py demo: 2000 steps x 32 images at 32x32",
        "stages": [
            {
                "name": "demo",
                "steps": 2000,
                "buckets": "32x32",
                "global_batch": 32,
                "caption_tokens": 8,  # short alt-text captions; padded to 16 below
                "text_offset": 0,
                "text_pad_to": 16,
            },
        ],
    }
