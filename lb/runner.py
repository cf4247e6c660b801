"""A bounded-frequency runner, as kube-proxy's ``async.BoundedFrequencyRunner`` (pkg/util/async).

Changes call ``run()`` (it only records that a run is wanted). The loop calls the function:
  - at most once per ``min_interval`` (a burst of changes is coalesced into one run),
  - at least once per ``full_interval`` with ``full=True`` (the periodic full resync),
  - after a failure, again after a backoff (``retry_initial`` doubling to ``retry_max``), whether or
    not anything changed; the function decides what a retry redoes.
Time comes from an injected clock and sleep, so tests advance a fake timer instead of sleeping.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from .settings import SyncSettings

log = logging.getLogger("bpflb.runner")


class BoundedFrequencyRunner:
    def __init__(self, name: str, fn: Callable[[bool], Awaitable[None]], settings: SyncSettings,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 on_error: Callable[[BaseException], None] = lambda e: None) -> None:
        self.name, self.fn, self.s = name, fn, settings
        self.clock, self.sleep, self.on_error = clock, sleep, on_error
        self.wanted = asyncio.Event()
        self.wanted.set()  # the first run happens as soon as the loop starts
        self.runs = 0
        self.failures = 0  # consecutive
        self.last_run = -float("inf")  # clock() when the last run started
        self.last_full = 0.0
        self.full_wanted = True  # the first run is full

    def run(self) -> None:
        """A run is wanted (kube-proxy's Run): coalesced with others until the next allowed time."""
        self.wanted.set()

    def full(self) -> None:
        """The next run is a full one."""
        self.full_wanted = True
        self.wanted.set()

    def _next_deadline(self) -> float:
        """When a run happens even if nothing asks for one: the retry after a failure, else the resync."""
        if self.failures:
            return self.last_run + min(self.s.retry_initial * 2 ** (self.failures - 1), self.s.retry_max)
        return self.last_full + self.s.full_resync

    async def _wait(self, timeout: float) -> None:
        """Until run() is called or ``timeout`` passes (on the injected sleep)."""
        if self.wanted.is_set():
            return
        if timeout <= 0:
            return
        wanted = asyncio.ensure_future(self.wanted.wait())
        timer = asyncio.ensure_future(self.sleep(timeout))
        try:
            await asyncio.wait({wanted, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (wanted, timer):
                t.cancel()
            await asyncio.gather(wanted, timer, return_exceptions=True)

    async def loop(self, stop: asyncio.Event) -> None:
        self.last_full = self.clock()
        while not stop.is_set():
            await self._wait(self._next_deadline() - self.clock())
            if stop.is_set():
                return
            now = self.clock()
            if now >= self.last_full + self.s.full_resync:
                self.full_wanted = True  # the periodic resync fell due
            gap = self.last_run + self.s.min_interval - now
            if gap > 0:
                await self.sleep(gap)  # coalesce: at most one run per min_interval
                if stop.is_set():
                    return
            self.wanted.clear()
            full = self.full_wanted
            self.last_run = self.clock()
            self.runs += 1
            try:
                await self.fn(full)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - retried with backoff; the function logs what failed
                self.failures += 1
                self.on_error(e)
                continue
            if self.failures:
                log.warning("%s recovered after %d failed attempt(s)", self.name, self.failures)
            self.failures = 0
            if full:
                self.full_wanted = False
                self.last_full = self.last_run
