"""python -m lens_jax.data.caption --images SRC --out DIR --model NAME [options]; --help lists them."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from lens_jax.data.caption.images import FORMATS
from lens_jax.data.caption.job import EXIT_ERROR, CaptionConfig, run_captioner
from lens_jax.data.caption.ledger import LedgerBusy


def build_parser() -> argparse.ArgumentParser:
    d = CaptionConfig(images="", out="", model="")
    p = argparse.ArgumentParser(
        prog="python -m lens_jax.data.caption",
        description="Dense and short captions for a set of images from any OpenAI-compatible vision chat "
                    "endpoint. Resumable: rerun the same command after a crash or a kill.",
        epilog="Outputs in --out: captions.jsonl (one line per accepted image), failed.jsonl (failures with "
               "reasons), summary.json. Exit status: 0 complete, 3 incomplete (budget, --limit or retryable "
               "failures: rerun), 2 error, 130 interrupted.")
    p.add_argument("--images", required=True, metavar="SRC",
                   help="a folder of images (recursive), a list file (one path per line), a TFDS build "
                        "directory, or tfds:NAME (prepared under --tfds-data-dir)")
    p.add_argument("--out", required=True, metavar="DIR", help="output and ledger directory")
    p.add_argument("--model", required=True, help="model name sent to the endpoint")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
                                                    "(default: the OpenAI API)")
    p.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY, else 'EMPTY'")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight (threads)")
    p.add_argument("--prompt-file", default=None, metavar="F", help="captioning instruction (default: the "
                                                                    "packaged instruction.txt)")
    p.add_argument("--requests-per-minute", type=float, default=None, metavar="RPM",
                   help="rate limit over all requests, retries included (default: none)")
    p.add_argument("--burst", type=int, default=d.burst, help="requests the rate limiter lets through at once")
    g = p.add_argument_group("cost")
    g.add_argument("--price-in", type=float, default=d.price_in, metavar="USD", help="per million prompt tokens")
    g.add_argument("--price-out", type=float, default=d.price_out, metavar="USD",
                   help="per million completion tokens")
    g.add_argument("--max-cost", type=float, default=None, metavar="USD",
                   help="stop before the estimated spend for this output directory exceeds this")
    g = p.add_argument_group("requests and retries")
    g.add_argument("--timeout", type=float, default=d.timeout, help="seconds per request")
    g.add_argument("--max-attempts", type=int, default=d.max_attempts, help="requests per image, retries included")
    g.add_argument("--backoff", type=float, default=d.backoff, help="seconds: first retry's jitter window")
    g.add_argument("--max-backoff", type=float, default=d.max_backoff)
    g.add_argument("--max-retry-after", type=float, default=d.max_retry_after,
                   help="cap on a server's Retry-After, seconds")
    g.add_argument("--max-tokens", type=int, default=d.max_tokens, help="answer length cap (0: not sent)")
    g.add_argument("--max-tokens-param", default=d.max_tokens_param, choices=("max_tokens", "max_completion_tokens"))
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--image-detail", default=None, choices=("low", "high", "auto"), help="OpenAI image detail")
    g.add_argument("--json-mode", action="store_true", help="send response_format json_object")
    g = p.add_argument_group("images")
    g.add_argument("--max-side", type=int, default=d.max_side, help="long side of the image sent, pixels")
    g.add_argument("--image-format", default=d.image_format, choices=FORMATS)
    g.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality)
    g.add_argument("--split", action="append", default=None, dest="splits",
                   help="TFDS split (repeatable; default: all)")
    g.add_argument("--tfds-data-dir", default=None)
    g.add_argument("--image-feature", default=d.image_feature, help="TFDS image feature")
    g = p.add_argument_group("answer validation")
    g.add_argument("--min-words", type=int, default=d.min_words, help="dense caption")
    g.add_argument("--max-words", type=int, default=d.max_words, help="dense caption")
    g.add_argument("--short-min-words", type=int, default=d.short_min_words)
    g.add_argument("--short-max-words", type=int, default=d.short_max_words)
    g = p.add_argument_group("run")
    g.add_argument("--retry-failed", action="store_true",
                   help="also retry images that failed for good (refusals, invalid answers, unreadable)")
    g.add_argument("--limit", type=int, default=None, help="caption at most N images in this run")
    g.add_argument("--no-fsync", dest="fsync", action="store_false",
                   help="skip fsync per record (still safe against a killed process, not a power loss)")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--seed", type=int, default=None, help="seed of the backoff jitter")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "openai"):  # one INFO line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    fields = vars(args)
    fields["splits"] = tuple(fields["splits"]) if fields["splits"] else None
    fields["max_tokens"] = fields["max_tokens"] or None
    try:
        summary = run_captioner(CaptionConfig(**fields))
    except (ValueError, FileNotFoundError, LedgerBusy) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(summary, indent=1))
    if summary.get("fatal_error"):
        print(f"error: {summary['fatal_error']}", file=sys.stderr)
    return summary["exit_code"]
