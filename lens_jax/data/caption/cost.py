"""Token accounting, cost estimate and the ``--max-cost`` budget.

Cost is ``prompt_tokens * price_in + completion_tokens * price_out`` with prices in USD per million
tokens, from the ``usage`` the server reports for every answered attempt (rejected answers cost too).

The budget covers the whole output directory: what earlier runs recorded in the ledger counts, so a
killed run restarted with the same command does not spend the budget twice. A request is only sent
while ``spent + (requests in flight + 1) * the largest per-request cost seen so far <= max_cost``.
The first estimate comes from the ledger (the largest cost per request of a recorded image); with
none yet nothing is known, so requests go one at a time until a first answer is priced. The run stops
cleanly when the next request might exceed the budget; raising ``--max-cost`` and rerunning continues.
This is an estimate: a request that costs more than any before it can still overshoot by that excess.
"""

from __future__ import annotations

import dataclasses
import threading

_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class Prices:
    """USD per million tokens."""

    input_per_m: float = 0.0
    output_per_m: float = 0.0

    def __post_init__(self):
        if self.input_per_m < 0 or self.output_per_m < 0:
            raise ValueError("prices must be >= 0")

    @property
    def free(self) -> bool:
        return self.input_per_m == 0 and self.output_per_m == 0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_m + completion_tokens * self.output_per_m) / 1e6


class Budget:
    """Thread-safe spend counter with reservations for requests in flight."""

    def __init__(self, max_cost: float | None, prices: Prices, spent_before: float = 0.0,
                 request_cost_estimate: float | None = None):
        if max_cost is not None and max_cost < 0:
            raise ValueError(f"max_cost must be >= 0, got {max_cost}")
        self.max_cost = max_cost
        self.prices = prices
        self.spent_before = float(spent_before)
        self.spent = 0.0  # this run
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._in_flight = 0
        # The largest cost of one request seen so far (seeded from earlier runs' records).
        self._largest = request_cost_estimate if request_cost_estimate else None
        self._cond = threading.Condition()
        self.exhausted = False

    @property
    def total_spent(self) -> float:
        return self.spent_before + self.spent

    def reserve(self, stop: threading.Event | None = None) -> bool:
        """Before an attempt: True to go ahead (call :meth:`settle` after it), False when over budget."""
        with self._cond:
            if self.max_cost is None:
                self._in_flight += 1
                return True
            while self._largest is None and self._in_flight > 0 and not (stop is not None and stop.is_set()):
                self._cond.wait(0.1)  # the first priced request runs alone
            if stop is not None and stop.is_set():
                return False
            est = self._largest or 0.0
            if self.total_spent + (self._in_flight + 1) * est > self.max_cost + _EPS:
                self.exhausted = True
                return False
            self._in_flight += 1
            return True

    def settle(self, prompt_tokens: int = 0, completion_tokens: int = 0, *, priced: bool = True) -> float:
        """After an attempt: adds its tokens; ``priced`` when the server reported usage. Returns its cost."""
        c = self.prices.cost(prompt_tokens, completion_tokens)
        with self._cond:
            self._in_flight = max(0, self._in_flight - 1)
            self.spent += c
            self.prompt_tokens += int(prompt_tokens)
            self.completion_tokens += int(completion_tokens)
            if priced:
                self._largest = c if self._largest is None else max(self._largest, c)
            self._cond.notify_all()
        return c
