"""A small consecutive-failure circuit breaker (closed -> open -> half-open -> closed)."""

from __future__ import annotations

import time
from typing import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """After `failures` consecutive failures, refuse calls for `reset_s`; then let ONE probe through.

    The probe's success closes the breaker; its failure re-opens it for another `reset_s`. While open, callers skip the
    backend entirely, so a dead Redis costs nothing per request (no connect attempts, no retry storm).
    """

    def __init__(self, failures: int = 5, reset_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        if failures < 1:
            raise ValueError("breaker failures must be >= 1")
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._state = CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.opened_count = 0  # how many times it tripped (for logs / health)

    @property
    def state(self) -> str:
        return self._state

    def allow(self) -> bool:
        if self._state == CLOSED:
            return True
        if self._state == OPEN and self._clock() - self._opened_at >= self.reset_s:
            self._state = HALF_OPEN
            self._probe_in_flight = False
        if self._state == HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._state = CLOSED
        self._consecutive = 0
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self._consecutive += 1
        if self._state == HALF_OPEN or (self._state == CLOSED and self._consecutive >= self.failures):
            self._trip()

    def release_probe(self) -> None:
        """The probe was cancelled without an answer: let the next caller probe instead of staying stuck."""
        if self._state == HALF_OPEN:
            self._probe_in_flight = False

    def _trip(self) -> None:
        if self._state != OPEN:
            self.opened_count += 1
        self._state = OPEN
        self._opened_at = self._clock()
        self._probe_in_flight = False
