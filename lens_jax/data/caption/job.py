"""The captioning job: a pool of worker threads over a source, writing to the ledger.

``run_captioner(CaptionConfig(...))`` opens the source and the ledger of ``out`` (resuming whatever an
earlier run finished), then ``concurrency`` threads each take the next image that is neither done nor
failed for good, decode and encode it, ask for its captions (:func:`request.caption_image`) and append
the outcome to the ledger. Every request takes a token from the shared rate limiter and a
reservation from the cost budget. The job ends when the source is exhausted, the budget is, a fatal
server error occurs (bad key, unknown model) or on SIGINT/SIGTERM (requests in flight are finished
and recorded first). SIGKILL needs nothing: the ledger is valid after any instant, and rerunning the
same command redoes only what was not recorded. A summary goes to ``out/summary.json`` and is returned.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from lens_jax.data.caption import answer as answer_lib
from lens_jax.data.caption.cost import Budget, Prices
from lens_jax.data.caption.images import UnreadableImage, encode_image
from lens_jax.data.caption.ledger import Ledger, write_atomic
from lens_jax.data.caption.ratelimit import RateLimiter
from lens_jax.data.caption.request import RequestConfig, caption_image, load_instruction, make_client
from lens_jax.data.caption.sources import Item, open_images

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
EXIT_COMPLETE = 0  # every image is captioned or failed for good
EXIT_ERROR = 2  # bad arguments, busy output directory, fatal server error
EXIT_INCOMPLETE = 3  # stopped by --max-cost or --limit, or retryable failures left: rerun to go on
EXIT_INTERRUPTED = 130


@dataclasses.dataclass
class CaptionConfig:
    images: str  # folder, list file, TFDS build directory or tfds:NAME
    out: str
    model: str
    base_url: str | None = None
    api_key: str | None = None
    concurrency: int = 8
    prompt_file: str | None = None
    requests_per_minute: float | None = None
    burst: int = 1
    max_cost: float | None = None  # USD for the whole output directory
    price_in: float = 0.0  # USD per million prompt tokens
    price_out: float = 0.0  # USD per million completion tokens
    timeout: float = 60.0
    max_attempts: int = 5
    backoff: float = 1.0
    max_backoff: float = 30.0
    max_retry_after: float = 300.0
    max_side: int = 768
    image_format: str = "jpeg"
    jpeg_quality: int = 90
    min_words: int = 15
    max_words: int = 400
    short_min_words: int = 2
    short_max_words: int = 40
    max_tokens: int | None = 1024
    max_tokens_param: str = "max_tokens"
    temperature: float | None = None
    image_detail: str | None = None
    json_mode: bool = False
    splits: tuple[str, ...] | None = None  # TFDS splits (default: all)
    tfds_data_dir: str | None = None
    image_feature: str = "image"
    retry_failed: bool = False  # also retry images that failed for good
    limit: int | None = None  # caption at most this many images in this run
    fsync: bool = True
    progress: bool = True
    seed: int | None = None  # backoff jitter

    def validate(self) -> "CaptionConfig":
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        prices = Prices(self.price_in, self.price_out)
        if self.max_cost is not None and prices.free:
            raise ValueError("--max-cost needs --price-in and/or --price-out (USD per million tokens)")
        self.request_config()  # checks its fields
        return self

    def bounds(self) -> answer_lib.Bounds:
        return answer_lib.Bounds(self.min_words, self.max_words, self.short_min_words, self.short_max_words)

    def request_config(self) -> RequestConfig:
        return RequestConfig(
            model=self.model, timeout=self.timeout, max_attempts=self.max_attempts, backoff=self.backoff,
            max_backoff=self.max_backoff, max_retry_after=self.max_retry_after, max_tokens=self.max_tokens,
            max_tokens_param=self.max_tokens_param, temperature=self.temperature, image_detail=self.image_detail,
            json_mode=self.json_mode, bounds=self.bounds())


class _Job:
    def __init__(self, cfg: CaptionConfig, client, source, ledger: Ledger):
        self.cfg = cfg
        self.client = client
        self.source = source
        self.ledger = ledger
        self.instruction = load_instruction(cfg.prompt_file)
        self.req = cfg.request_config()
        self.limiter = RateLimiter(cfg.requests_per_minute, cfg.burst)
        spent = ledger.spent()
        self.budget = Budget(cfg.max_cost, Prices(cfg.price_in, cfg.price_out), spent["cost_usd"],
                             spent["max_request_cost_usd"])
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.stopped: str | None = None
        self.fatal: str | None = None
        self.error: BaseException | None = None
        self.taken = 0
        self._iter = (it for it in source if self._todo(it))
        self.bar = None

    def _todo(self, item: Item) -> bool:
        if self.ledger.is_done(item.key):
            return False
        failure = self.ledger.failure(item.key)
        return failure is None or bool(failure.get("retryable")) or self.cfg.retry_failed

    def _next(self) -> Item | None:
        with self.lock:
            if self.stop.is_set():
                return None
            if self.cfg.limit is not None and self.taken >= self.cfg.limit:
                if self.stopped is None:
                    self.stopped = "limit"
                return None
            item = next(self._iter, None)
            if item is not None:
                self.taken += 1
            return item

    def _halt(self, why: str) -> None:
        with self.lock:
            if self.stopped is None:
                self.stopped = why
        self.stop.set()

    def _record_failure(self, item: Item, kind: str, reason: str, retryable: bool, out=None) -> None:
        rec = {"key": item.key, "source": item.source, "kind": kind, "reason": reason, "retryable": retryable,
               "model": self.cfg.model, "attempts": out.attempts if out else 0,
               "prompt_tokens": out.prompt_tokens if out else 0,
               "completion_tokens": out.completion_tokens if out else 0,
               "cost_usd": round(out.cost_usd, 9) if out else 0.0}
        if self.ledger.record_failed(rec):
            with self.lock:
                self.counts["failed"] += 1

    def _process(self, item: Item, rng: random.Random) -> bool:
        """Captions one item; True when its outcome was recorded."""
        try:
            image = encode_image(item.load(), max_side=self.cfg.max_side, fmt=self.cfg.image_format,
                                 quality=self.cfg.jpeg_quality, exif_transpose=self.source.kind != "tfds")
        except UnreadableImage as exc:
            self._record_failure(item, "unreadable", f"unreadable image: {exc}", False)
            return True
        except Exception as exc:  # missing file, permission, a tfds read error, ...
            self._record_failure(item, "unreadable", f"unreadable image: {type(exc).__name__}: {exc}"[:400], False)
            return True
        out = caption_image(self.client, image, self.instruction, self.req, key=item.key, limiter=self.limiter,
                            budget=self.budget, stop=self.stop, rng=rng)
        with self.lock:
            self.counts["requests"] += out.attempts
            self.counts["usage_missing"] += out.usage_missing
        if out.status == "done":
            rec = {"key": item.key, "source": item.source, "dense_caption": out.dense, "short_caption": out.short,
                   "width": image.width, "height": image.height, "model": self.cfg.model,
                   "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                   "cost_usd": round(out.cost_usd, 9), "attempts": out.attempts}
            if self.ledger.record_done(rec):
                with self.lock:
                    self.counts["done"] += 1
            return True
        if out.status == "failed":
            self._record_failure(item, out.kind, out.reason, out.retryable, out)
            return True
        if out.status == "fatal":
            with self.lock:
                self.fatal = self.fatal or out.reason
            self._halt("fatal")
        elif out.budget_exhausted:
            self._halt("max_cost")
        return False

    def _worker(self, index: int) -> None:
        seed = None if self.cfg.seed is None else self.cfg.seed * 1000 + index
        rng = random.Random(seed)
        try:
            while True:
                item = self._next()
                if item is None:
                    return
                if self._process(item, rng):
                    self._tick()
        except BaseException as exc:  # a bug: stop everybody, report it from the main thread
            log.exception("captioning worker failed")
            with self.lock:
                self.error = self.error or exc
            self._halt("error")

    def _tick(self) -> None:
        if self.bar is None:
            return
        with self.lock:
            self.bar.update(1)
            post = {"failed": self.counts["failed"]}
            if not self.budget.prices.free:
                post["usd"] = f"{self.budget.total_spent:.4f}"
            self.bar.set_postfix(post, refresh=False)

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        total = len(self.source)
        pending = sum(1 for it in self.source if self._todo(it))
        self.bar = tqdm(total=total, initial=total - pending, unit="img", disable=not self.cfg.progress,
                        dynamic_ncols=True, smoothing=0.05, desc="captions")
        threads = [threading.Thread(target=self._worker, args=(i,), daemon=True, name=f"caption-{i}")
                   for i in range(min(self.cfg.concurrency, max(1, pending)))]
        old_term = None
        if threading.current_thread() is threading.main_thread():
            old_term = signal.signal(signal.SIGTERM, lambda *_: self._halt("terminated"))
        t0 = time.perf_counter()
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            log.warning("interrupted: finishing the requests in flight (Ctrl-C again to quit at once)")
            self._halt("interrupted")
            for t in threads:
                t.join()
        finally:
            elapsed = time.perf_counter() - t0
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            self.bar.close()
        return self._summary(total, pending, elapsed)

    def _summary(self, total: int, pending: int, elapsed: float) -> dict[str, Any]:
        remaining = sum(1 for it in self.source if self._todo(it))
        failed = [self.ledger.failure(it.key) for it in self.source if self.ledger.failure(it.key)]
        done = sum(1 for it in self.source if self.ledger.is_done(it.key))
        spent = self.ledger.spent()
        c = self.counts
        if self.fatal:
            self.stopped = "fatal"
        if self.stopped == "limit" and remaining == 0:
            self.stopped = None
        summary = {
            "images": total,
            "done": done,
            "failed": len(failed),
            "failed_by_kind": dict(Counter(f.get("kind", "?") for f in failed)),
            "failed_retryable": sum(1 for f in failed if f.get("retryable")),
            "remaining": remaining,
            "skipped": total - pending,
            "stopped": self.stopped,
            "fatal_error": self.fatal,
            "run": {
                "done": c["done"], "failed": c["failed"], "requests": c["requests"],
                "elapsed_s": round(elapsed, 3),
                "requests_per_s": round(c["requests"] / elapsed, 3) if elapsed > 0 else 0.0,
                "images_per_s": round((c["done"] + c["failed"]) / elapsed, 3) if elapsed > 0 else 0.0,
                "prompt_tokens": self.budget.prompt_tokens, "completion_tokens": self.budget.completion_tokens,
                "cost_usd": round(self.budget.spent, 6), "answers_without_usage": c["usage_missing"],
            },
            "total": {"prompt_tokens": spent["prompt_tokens"], "completion_tokens": spent["completion_tokens"],
                      "cost_usd": round(spent["cost_usd"], 6), "requests": spent["attempts"]},
            "max_cost_usd": self.cfg.max_cost,
            "model": self.cfg.model,
            "base_url": self.cfg.base_url,
            "source": self.source.description,
            "out": str(self.ledger.dir),
        }
        summary["exit_code"] = exit_code(summary)
        return summary


def exit_code(summary: dict[str, Any]) -> int:
    if summary.get("stopped") in ("fatal", "error"):
        return EXIT_ERROR
    if summary.get("stopped") in ("interrupted", "terminated"):
        return EXIT_INTERRUPTED
    return EXIT_COMPLETE if summary.get("remaining", 0) == 0 else EXIT_INCOMPLETE


def run_captioner(cfg: CaptionConfig, *, client=None) -> dict[str, Any]:
    """Runs (or resumes) the job; returns the summary (also written to ``out/summary.json``).

    Raises ValueError / FileNotFoundError for bad arguments and ledger.LedgerBusy when another job
    holds ``out``. ``client``: an ``openai.OpenAI``-like object (default: one for ``base_url``).
    """
    cfg.validate()
    out = Path(cfg.out).expanduser()
    source = open_images(cfg.images, splits=cfg.splits, tfds_data_dir=cfg.tfds_data_dir,
                         image_feature=cfg.image_feature, exclude=[out])
    load_instruction(cfg.prompt_file)  # fail before taking the directory
    ledger = Ledger(out, fsync=cfg.fsync)
    own_client = client is None
    try:
        if own_client:
            client = make_client(cfg.base_url, cfg.api_key, cfg.timeout)
        job = _Job(cfg, client, source, ledger)
        if job.budget.max_cost is not None and job.budget.total_spent > 0:
            log.info("budget: %.6f of %.6f USD already spent in %s", job.budget.total_spent, cfg.max_cost, out)
        summary = job.run()
    finally:
        ledger.close()
        if own_client and client is not None:
            try:
                client.close()
            except Exception:
                pass
    write_atomic(out / SUMMARY_FILE, (json.dumps(summary, indent=1) + "\n").encode())
    if job.error is not None:
        raise RuntimeError(f"captioning stopped by an internal error: {job.error!r}") from job.error
    if summary["run"]["answers_without_usage"] and cfg.max_cost is not None:
        log.warning("%d answers came without token usage: their cost is unknown and --max-cost could not "
                    "count it", summary["run"]["answers_without_usage"])
    return summary
