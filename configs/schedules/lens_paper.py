"""The paper's pre-training schedule (SPEC section 5), for `python -m lens_jax.budget estimate`.

Stage 1: 512^2 only, 400K iterations, global batch 3072 (128 A100s x 24).
Stage 2: 400K iterations over 27 buckets = areas 512^2, 768^2, 1024^2 x 9 aspect ratios 1:2 .. 2:1,
per-GPU batch 24 / 10 / 6 by area on 128 GPUs (global 3072 / 1280 / 768 by area).

Choices the paper does not state (each one documented here and in the README):
- Aspect ratios (width:height) 1:2, 9:16, 2:3, 3:4, 1:1, 4:3, 3:2, 16:9, 2:1 (the nine of the released
  pipeline's inference table). Sizes: width = side * sqrt(r), height = side / sqrt(r), each rounded to
  the nearest multiple of 16 px (one token), e.g. 1456x720 at 1024^2, 2:1 (the released pipeline's
  inference table uses 1472x736 there: ~3% more tokens on the extreme ratios, <1% on the total).
- How the 400K stage-2 steps split over buckets: each (step, GPU) slot draws one of the 27 buckets with
  equal probability and takes that area's per-GPU batch, so the expected global batch is
  128 x (24 + 10 + 6) / 3 = 1706.7 samples/step. One bucket per step for all GPUs gives the same
  expectation. Per-step compute is nearly the same at every area by design (24 x 1024 ~ 10 x 2304 ~
  6 x 4096 image tokens per GPU), so the split barely moves the total.
- Caption length: captions average ~109 words (GPT-4.1 dense captions); at ~1.33 o200k tokens per
  English word (the usual 0.75 words/token) that is ~145 tokens. The encoder reads the rendered chat
  template around it: a 97-token preamble (system + developer header, dropped before the DiT, the
  pipeline's DEFAULT_TXT_OFFSET) and a 22-token tail after the caption that does reach the DiT
  (<|end|>, <|start|>assistant<|channel|>analysis<|message|>, the 10-token thinking "Need to generate
  one image according to the description.", <|end|>, <|start|>assistant<|channel|>final<|message|>;
  the text is cut before <|return|>). So the encoder reads 97 + 145 + 22 = 264 tokens and the DiT
  167 text tokens per sample. The PyTorch pipeline pads to the longest caption of a per-GPU batch; the
  mean length is used here (text_pad_to = 0). A static-shape JAX loop padding to 512 would instead
  cost 512 encoder / 415 DiT text tokens: set text_pad_to = 512 to see that.
- Nothing precomputed: the frozen GPT-OSS-20B forward and the FLUX.2 VAE encode run in every step
  (precomputed_text / precomputed_latents = False). The calculator reports the totals with and
  without these frozen-model FLOPs.
"""

from lens_jax.budget.schedule import PAPER_RATIOS, aspect_buckets

CAPTION_WORDS = 109
TOKENS_PER_WORD = 1.33  # o200k_harmony on English prose (~0.75 words per token)


def get_schedule():
    buckets_27 = [size for side in (512, 768, 1024) for size in aspect_buckets(side, PAPER_RATIOS, multiple=16)]
    return {
        "name": "lens_paper",
        "description": "Lens pre-training (paper): 400K iters at 512^2, then 400K iters over 27 buckets",
        "defaults": {
            "caption_tokens": round(CAPTION_WORDS * TOKENS_PER_WORD),  # 145
            "template_tokens": 22,
            "text_offset": 97,
            "text_pad_to": 0,
            "max_text_len": 512,
            "precomputed_text": False,
            "precomputed_latents": False,
        },
        "stages": [
            {
                "name": "stage1_512",
                "steps": 400_000,
                "buckets": "512x512",
                "global_batch": 3072,
                "devices": 128,  # only for the wall-clock line
                "notes": "128 A100-80GB x 24, constant LR 2e-4, mu_t 1.06",
            },
            {
                "name": "stage2_27buckets",
                "steps": 400_000,
                "buckets": buckets_27,
                "devices": 128,
                "per_device_batch": {"512": 24, "768": 10, "1024": 6},
                "notes": "LR 1e-4; uniform over the 27 buckets per (step, GPU) slot",
            },
        ],
    }
