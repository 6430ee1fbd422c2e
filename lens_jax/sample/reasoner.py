"""Prompt reasoner: an LLM rewrites a short prompt into a dense description before text encoding.

Talks to any OpenAI-compatible chat-completions endpoint through the ``openai`` client (a hosted
API, or a local vLLM / llama.cpp / Ollama server via ``base_url``). The system prompt lives in a
text file (``reasoner_system_prompt.txt`` next to this module by default; ``python -m
lens_jax.reasoner optimize`` improves it without training).

``rewrite_prompt`` never raises: on a failure (HTTP 5xx, 429 after the retries, a timeout, a
refused connection, an empty answer, an unreadable system-prompt file, ...) it emits a
``ReasonerWarning`` naming the reason and returns the original prompt, so generation always
goes on. The lower-level ``chat_completion`` / ``rewrite_with_system_prompt`` raise
``ReasonerError`` instead, for callers (the optimize loop) that need to tell failures apart.
"""

from __future__ import annotations

import os
import random
import re
import time
import warnings
from pathlib import Path

DEFAULT_SYSTEM_PROMPT_FILE = Path(__file__).with_name("reasoner_system_prompt.txt")
PLACEHOLDER_API_KEY = "EMPTY"  # local OpenAI-compatible servers accept any key

# Statuses worth another try: request timeout, conflict, rate limit, and server-side errors.
_RETRYABLE_STATUS = {408, 409, 429}


class ReasonerError(RuntimeError):
    """A chat completion that failed for good (after any retries); ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ReasonerWarning(UserWarning):
    """The reasoner failed and the original prompt is used instead."""


def load_system_prompt(path: str | os.PathLike | None = None) -> str:
    """The system prompt text from ``path`` (the packaged default when None), stripped."""
    text = Path(path if path is not None else DEFAULT_SYSTEM_PROMPT_FILE).read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"system prompt file {path or DEFAULT_SYSTEM_PROMPT_FILE} is empty")
    return text


def resolve_api_key(api_key: str | None = None) -> str:
    """The argument, else $OPENAI_API_KEY, else a placeholder (local servers need no key)."""
    return api_key or os.environ.get("OPENAI_API_KEY") or PLACEHOLDER_API_KEY


def make_client(base_url: str | None = None, api_key: str | None = None, timeout: float = 30):
    """An ``openai.OpenAI`` client with the library's own retries off (we retry ourselves)."""
    import openai

    return openai.OpenAI(base_url=base_url, api_key=resolve_api_key(api_key), timeout=timeout, max_retries=0)


_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def clean_answer(text: str | None) -> str:
    """Strip whitespace, reasoning-model ``<think>`` blocks and one pair of wrapping quotes."""
    if not text:
        return ""
    text = _THINK_RE.sub("", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def _backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with "equal jitter": half fixed, half uniform random, capped."""
    d = min(cap, base * (2**attempt))
    return d / 2 + random.uniform(0, d / 2)


def _retry_after(exc) -> float | None:
    """Seconds from a ``Retry-After`` header on an API status error, if any."""
    resp = getattr(exc, "response", None)
    try:
        value = resp.headers.get("retry-after") if resp is not None else None
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _classify(exc: BaseException) -> tuple[str, bool]:
    """(reason, retryable) for an exception raised by the openai client."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return "request timed out", True
    if isinstance(exc, openai.APIConnectionError):
        return f"connection error ({exc.__cause__ or exc})", True
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retryable = status in _RETRYABLE_STATUS or status >= 500
        return f"HTTP {status} ({str(exc)[:200]})", retryable
    return f"{type(exc).__name__}: {str(exc)[:200]}", False


def chat_completion(
    messages: list[dict],
    *,
    model: str,
    base_url: str | None = None,
    timeout: float = 30,
    retries: int = 3,
    api_key: str | None = None,
    client=None,
    temperature: float | None = None,
    backoff: float = 0.5,
    max_backoff: float = 8.0,
    max_total_time: float | None = None,
) -> str:
    """The cleaned, non-empty answer to ``messages``; raises ``ReasonerError`` once all tries fail.

    Up to ``1 + retries`` tries. Timeouts, refused connections, 408/409/429, 5xx and empty answers
    are retried after an exponential backoff with jitter (a server's ``Retry-After`` is honoured,
    capped at ``max_backoff``); other errors (401, 404, bad request, ...) fail at once. The whole
    call stops after ``max_total_time`` seconds (default: every try timing out plus every backoff
    at its cap), shortening the last request's timeout to what is left.
    """
    retries = max(0, int(retries))
    if max_total_time is None:
        max_total_time = timeout * (retries + 1) + max_backoff * retries
    deadline = time.monotonic() + max_total_time
    own_client = client is None
    if own_client:
        try:
            client = make_client(base_url, api_key, timeout)
        except Exception as exc:  # openai missing, bad base_url, ...
            raise ReasonerError(f"could not create the OpenAI client: {type(exc).__name__}: {exc}") from exc
    kwargs = {} if temperature is None else {"temperature": temperature}
    reason = "no attempt made"
    try:
        for attempt in range(retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0.05:
                reason = f"{reason}; gave up after {max_total_time:.1f} s in total"
                break
            retry_after = None
            try:
                resp = client.chat.completions.create(
                    model=model, messages=messages, timeout=min(timeout, remaining), **kwargs
                )
                content = resp.choices[0].message.content if resp.choices else None
                answer = clean_answer(content)
                if answer:
                    return answer
                reason, retryable = "empty answer", True
            except Exception as exc:
                reason, retryable = _classify(exc)
                retry_after = _retry_after(exc)
            if not retryable or attempt == retries:
                break
            delay = _backoff_delay(attempt, backoff, max_backoff)
            if retry_after is not None:
                delay = max(delay, min(retry_after, max_backoff))
            delay = min(delay, max(0.0, deadline - time.monotonic() - 0.05))
            time.sleep(delay)
        raise ReasonerError(f"{reason} (after {attempt + 1} tr{'y' if attempt == 0 else 'ies'})")
    finally:
        if own_client:
            try:
                client.close()
            except Exception:
                pass


def rewrite_with_system_prompt(prompt: str, system_prompt: str, *, model: str, **kwargs) -> str:
    """The rewrite of ``prompt`` under ``system_prompt``; raises ``ReasonerError`` on failure."""
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
    return chat_completion(messages, model=model, **kwargs)


def rewrite_prompt(
    prompt: str,
    *,
    model: str,
    base_url: str | None,
    system_prompt_file: str | None = None,
    timeout: float = 30,
    retries: int = 3,
    api_key: str | None = None,
    **kwargs,
) -> str:
    """A dense description of ``prompt`` from the LLM ``model``; the original prompt on any failure.

    ``base_url`` is the OpenAI-compatible endpoint (``http://host:port/v1``; None: the OpenAI API).
    ``system_prompt_file`` defaults to the packaged ``reasoner_system_prompt.txt``. The API key is
    ``api_key``, else $OPENAI_API_KEY, else ``"EMPTY"``. Extra keyword arguments (``backoff``,
    ``max_backoff``, ``max_total_time``, ``temperature``, ``client``) go to ``chat_completion``.
    Never raises: a failure gives a ``ReasonerWarning`` with the reason and the original prompt.
    """
    if not prompt or not prompt.strip():
        return prompt
    try:
        system_prompt = load_system_prompt(system_prompt_file)
        return rewrite_with_system_prompt(
            prompt, system_prompt, model=model, base_url=base_url, timeout=timeout, retries=retries,
            api_key=api_key, **kwargs,
        )
    except ReasonerError as exc:
        reason = exc.reason
    except Exception as exc:  # never crash generation over the optional reasoner
        reason = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"prompt reasoner {model!r} at {base_url or 'the OpenAI API'} failed: {reason}; using the original prompt",
        ReasonerWarning,
        stacklevel=2,
    )
    return prompt
