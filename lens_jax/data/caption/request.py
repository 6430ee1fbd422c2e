"""One image, one caption: the request to an OpenAI-compatible chat endpoint and its retry policy.

The image goes as an ``image_url`` content part (a base64 data URL) after the captioning instruction,
in one user message; both captions are asked for in the same call. The ``openai`` client is created
with ``max_retries=0``: the loop here owns retrying, so its behaviour is the same on every server and
testable.

Per image, at most ``max_attempts`` requests are made. After each:

* timeouts, connection errors, HTTP 408/409/429/5xx: wait (exponential backoff with full jitter,
  ``uniform(0, min(max_backoff, backoff * 2**n))``, at least the server's ``Retry-After`` /
  ``retry-after-ms``; a 429's Retry-After also pauses the shared rate limiter, i.e. every worker) and
  try again. If every attempt fails like this the failure is *retryable*: the next run tries again.
* an answer that is empty, cut off (finish_reason "length"), a refusal, or not two captions within
  the word bounds (see :mod:`.answer`): try again at once; after the last attempt the image fails
  for good with the last reason.
* HTTP 401/403/404 (bad key, unknown model or URL): fatal, the job stops: every image would fail.
* other HTTP 4xx (a request the server will not take for this image): the image fails for good.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from lens_jax.data.caption.answer import Bounds, check_answer
from lens_jax.data.caption.cost import Budget
from lens_jax.data.caption.images import EncodedImage
from lens_jax.data.caption.ratelimit import RateLimiter

DEFAULT_INSTRUCTION_FILE = Path(__file__).with_name("instruction.txt")
PLACEHOLDER_API_KEY = "EMPTY"  # local OpenAI-compatible servers accept any key
ITEM_HEADER = "X-Caption-Item"  # a hash of the image's key: lets a server (or a test) tell images apart
_RETRYABLE_STATUS = {408, 409, 425, 429}
_FATAL_STATUS = {401, 403, 404}


def load_instruction(path: str | os.PathLike | None = None) -> str:
    """The captioning instruction from ``path`` (the packaged ``instruction.txt`` when None), stripped."""
    p = Path(path) if path is not None else DEFAULT_INSTRUCTION_FILE
    text = p.read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"instruction file {p} is empty")
    return text


def item_id(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def make_client(base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0):
    """An ``openai.OpenAI`` client without its own retries. Key: the argument, $OPENAI_API_KEY, else "EMPTY"."""
    import openai

    key = api_key or os.environ.get("OPENAI_API_KEY") or PLACEHOLDER_API_KEY
    return openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)


@dataclasses.dataclass(frozen=True)
class RequestConfig:
    model: str
    timeout: float = 60.0  # seconds per request
    max_attempts: int = 5  # requests per image, retries included
    backoff: float = 1.0  # seconds: the first retry's jitter window
    max_backoff: float = 30.0
    max_retry_after: float = 300.0  # a longer Retry-After is cut to this
    max_tokens: int | None = 1024
    max_tokens_param: str = "max_tokens"  # or "max_completion_tokens" (OpenAI reasoning models)
    temperature: float | None = None
    image_detail: str | None = None  # "low" / "high" / "auto": OpenAI's image_url detail
    json_mode: bool = False  # response_format {"type": "json_object"}
    bounds: Bounds = Bounds()

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        if self.max_tokens_param not in ("max_tokens", "max_completion_tokens"):
            raise ValueError(f"max_tokens_param: max_tokens or max_completion_tokens, got {self.max_tokens_param!r}")


@dataclasses.dataclass
class Outcome:
    status: str  # "done", "failed", "stopped" (stop event or budget) or "fatal"
    dense: str = ""
    short: str = ""
    kind: str = ""  # for failures: "request", "refusal", "invalid", "empty"
    reason: str = ""
    retryable: bool = False
    attempts: int = 0  # requests sent
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    usage_missing: int = 0  # answered requests without a usage report
    budget_exhausted: bool = False


def build_messages(instruction: str, image: EncodedImage, detail: str | None = None) -> list[dict]:
    image_url: dict[str, Any] = {"url": image.data_url}
    if detail:
        image_url["detail"] = detail
    return [{"role": "user", "content": [{"type": "text", "text": instruction},
                                         {"type": "image_url", "image_url": image_url}]}]


def retry_after_seconds(exc) -> float | None:
    """The wait a server asked for (``retry-after-ms``, ``retry-after`` in seconds or as an HTTP date)."""
    resp = getattr(exc, "response", None)
    headers = getattr(resp, "headers", None)
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
    except (TypeError, ValueError):
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def classify_error(exc: BaseException, timeout: float) -> tuple[str, str]:
    """(reason, action) with action "retry", "fail" (this image, for good) or "fatal" (the job)."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return f"request timed out (> {timeout:g} s)", "retry"
    if isinstance(exc, openai.APIConnectionError):
        return f"connection error ({exc.__cause__ or exc})"[:300], "retry"
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        msg = f"HTTP {status} ({str(exc)[:200]})"
        if status in _RETRYABLE_STATUS or status >= 500:
            return msg, "retry"
        if status in _FATAL_STATUS:
            return msg, "fatal"
        return msg, "fail"
    return f"{type(exc).__name__}: {str(exc)[:200]}", "retry"


def backoff_delay(retry: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**retry)]."""
    return (rng or random).uniform(0.0, min(cap, base * (2.0 ** retry)))


def _reason_with_history(reason: str, history: Counter, attempts: int) -> str:
    tries = f"{attempts} tr{'y' if attempts == 1 else 'ies'}"
    if len(history) > 1:
        tries += ": " + ", ".join(f"{n} {k}" for k, n in history.most_common())
    return f"{reason} (after {tries})"


def caption_image(client, image: EncodedImage, instruction: str, cfg: RequestConfig, *, key: str = "",
                  limiter: RateLimiter | None = None, budget: Budget | None = None,
                  stop: threading.Event | None = None, rng: random.Random | None = None) -> Outcome:
    """Asks for the captions of one image, retrying as described in the module docstring."""
    rng = rng or random.Random()
    stop = stop or threading.Event()
    messages = build_messages(instruction, image, cfg.image_detail)
    kwargs: dict[str, Any] = {"model": cfg.model, "messages": messages, "timeout": cfg.timeout,
                              "extra_headers": {ITEM_HEADER: item_id(key)}}
    if cfg.max_tokens:
        kwargs[cfg.max_tokens_param] = int(cfg.max_tokens)
    if cfg.temperature is not None:
        kwargs["temperature"] = cfg.temperature
    if cfg.json_mode:
        kwargs["response_format"] = {"type": "json_object"}
    out = Outcome("failed")
    history: Counter = Counter()
    transport_retries = 0
    kind, reason, retryable = "request", "no attempt made", True
    for _ in range(cfg.max_attempts):
        if stop.is_set():
            out.status = "stopped"
            return out
        if budget is not None and not budget.reserve(stop):
            out.status, out.budget_exhausted = "stopped", budget.exhausted
            return out
        if limiter is not None and not limiter.acquire(stop):
            if budget is not None:
                budget.settle(priced=False)
            out.status = "stopped"
            return out
        out.attempts += 1
        wait = 0.0
        try:
            resp = client.chat.completions.create(**kwargs)
        except Exception as exc:
            if budget is not None:
                budget.settle(priced=False)
            reason, action = classify_error(exc, cfg.timeout)
            history[reason.split(" (")[0]] += 1
            if action == "fatal":
                out.status, out.kind, out.reason = "fatal", "request", reason
                return out
            if action == "fail":
                out.kind, out.reason, out.retryable = "request", _reason_with_history(reason, history, out.attempts), False
                return out
            kind, retryable = "request", True
            wait = backoff_delay(transport_retries, cfg.backoff, cfg.max_backoff, rng)
            transport_retries += 1
            server_wait = retry_after_seconds(exc)
            if server_wait is not None:
                server_wait = min(server_wait, cfg.max_retry_after)
                wait = max(wait, server_wait)
                if getattr(exc, "status_code", None) == 429 and limiter is not None:
                    limiter.pause_until(time.monotonic() + server_wait)
        else:
            usage = getattr(resp, "usage", None)
            p = int(getattr(usage, "prompt_tokens", 0) or 0) if usage is not None else 0
            c = int(getattr(usage, "completion_tokens", 0) or 0) if usage is not None else 0
            cost = budget.settle(p, c, priced=usage is not None) if budget is not None else 0.0
            out.prompt_tokens += p
            out.completion_tokens += c
            out.cost_usd += cost
            out.usage_missing += usage is None
            choice = resp.choices[0] if getattr(resp, "choices", None) else None
            message = getattr(choice, "message", None)
            content = getattr(message, "content", None)
            refusal = getattr(message, "refusal", None)
            finish = getattr(choice, "finish_reason", None)
            retryable = False
            if refusal:
                kind, reason = "refusal", f"refusal: {str(refusal)[:120]!r}"
            elif finish == "content_filter":
                kind, reason = "refusal", "answer withheld by the server's content filter"
            elif finish == "length":
                kind, reason = "invalid", f"answer cut off at {cfg.max_tokens} tokens (finish_reason=length)"
            else:
                verdict = check_answer(content, cfg.bounds)
                if verdict.ok:
                    out.status, out.dense, out.short = "done", verdict.dense, verdict.short
                    out.kind = out.reason = ""
                    out.retryable = False
                    return out
                kind, reason = verdict.kind, verdict.reason
            history[kind] += 1
        if wait > 0 and out.attempts < cfg.max_attempts and stop.wait(wait):
            out.status = "stopped"
            return out
    out.status, out.kind, out.retryable = "failed", kind, retryable
    out.reason = _reason_with_history(reason, history, out.attempts)
    return out
