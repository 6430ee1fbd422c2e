"""A thread-safe token bucket shared by all workers; every HTTP attempt (retries included) takes a token.

``requests_per_minute`` tokens are added per minute up to ``burst``; a caller that finds the bucket
empty reserves a future token and sleeps until it is due, so waiting callers are served in order and
the long-run rate never exceeds the limit. ``pause_until`` holds everybody back (a server's 429
``Retry-After`` applies to the whole client, not only to the request that got it).
"""

from __future__ import annotations

import threading
import time


class RateLimiter:
    def __init__(self, requests_per_minute: float | None = None, burst: int = 1, clock=time.monotonic):
        if requests_per_minute is not None and requests_per_minute <= 0:
            raise ValueError(f"requests_per_minute must be positive, got {requests_per_minute}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.rate = None if requests_per_minute is None else requests_per_minute / 60.0  # tokens per second
        self.burst = int(burst)
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(self.burst)
        self._last = clock()
        self._paused_until = 0.0

    def pause_until(self, t: float) -> None:
        """No token is handed out before monotonic time ``t``."""
        with self._lock:
            self._paused_until = max(self._paused_until, t)

    def reserve(self) -> float:
        """Takes a token; returns how many seconds the caller must wait before using it."""
        with self._lock:
            now = self._clock()
            wait = max(0.0, self._paused_until - now)
            if self.rate is None:
                return wait
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1.0
            if self._tokens < 0:
                wait = max(wait, -self._tokens / self.rate)
            return wait

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Waits for a token; False when ``stop`` was set while waiting."""
        wait = self.reserve()
        if wait <= 0:
            return not (stop is not None and stop.is_set())
        if stop is None:
            time.sleep(wait)
            return True
        return not stop.wait(wait)
