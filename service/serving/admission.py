"""Admission control: at most `max_concurrency` requests run, at most `max_queue` wait (for `queue_timeout_s`);
the rest are refused at once (Overloaded, with when to retry). Bounded queue, bounded memory, and no
accepted request is dropped."""

from __future__ import annotations

import asyncio

from ..errors import Overloaded


def _full(retry_after_s: int, detail: str) -> Overloaded:
    return Overloaded(f"The gateway is at capacity ({detail}); retry shortly", code="overloaded",
                      retry_after_s=retry_after_s)


class Admission:
    def __init__(self, max_concurrency: int, max_queue: int, queue_timeout_s: float, retry_after_s: int):
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self._slots = asyncio.Semaphore(max_concurrency)
        self.running = 0
        self.waiting = 0

    async def acquire(self) -> None:
        if self.running < self.max_concurrency and not self.waiting:
            await self._slots.acquire()  # free slot: returns at once
            self.running += 1
            return
        if self.waiting >= self.max_queue:
            raise _full(self.retry_after_s, f"{self.running} running, {self.waiting} queued")
        self.waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.queue_timeout_s)
        except asyncio.TimeoutError:
            raise _full(self.retry_after_s, f"queued {self.queue_timeout_s:.0f} s without a free slot")
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        self._slots.release()
