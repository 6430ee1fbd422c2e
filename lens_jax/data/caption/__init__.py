"""Dense captioner: captions for a set of images from any OpenAI-compatible vision chat endpoint.

    python -m lens_jax.data.caption --images SRC --out DIR --model NAME [--base-url URL]
        [--concurrency N] [--prompt-file F] [--max-cost USD --price-in USD --price-out USD] ...

Modules, one job each:

    sources      folder / list file / TFDS dataset -> items with stable keys
    images       decode (corrupt -> UnreadableImage), resize to --max-side, base64 data URL
    request      the instruction, the openai call, retries (backoff + jitter, Retry-After), errors
    ratelimit    token bucket shared by the workers (--requests-per-minute)
    answer       dense + short caption from one answer (lenient JSON), validation, refusals
    cost         tokens -> USD, the --max-cost budget
    ledger       durable, crash-safe ledger; captions.jsonl and failed.jsonl are the ledger
    job          the worker pool, progress, summary
    cli          argument parsing (``__main__`` runs it)
    fake_server  a local OpenAI-compatible server with scripted faults, for tests and benchmarks

Output (``DIR``): ``captions.jsonl`` one JSON line per accepted image with ``key``, ``source``,
``dense_caption``, ``short_caption``, ``width``, ``height``, ``model``, ``prompt_tokens``,
``completion_tokens`` (plus ``cost_usd``, ``attempts``); ``failed.jsonl`` failures with ``kind`` and
``reason``; ``summary.json``.
"""

from lens_jax.data.caption.answer import Bounds, check_answer, parse_answer
from lens_jax.data.caption.images import UnreadableImage, encode_image
from lens_jax.data.caption.job import CaptionConfig, run_captioner
from lens_jax.data.caption.ledger import Ledger, load_captions, load_failures
from lens_jax.data.caption.request import DEFAULT_INSTRUCTION_FILE, load_instruction

__all__ = [
    "Bounds", "CaptionConfig", "DEFAULT_INSTRUCTION_FILE", "Ledger", "UnreadableImage", "check_answer",
    "encode_image", "load_captions", "load_failures", "load_instruction", "parse_answer", "run_captioner",
]
