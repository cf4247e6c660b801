"""The bounded-frequency runner on a fake timer: coalescing, minimum interval, periodic full resync,
retry with backoff. Nothing here sleeps for real: the timer is advanced."""
from __future__ import annotations

import asyncio

import pytest

from lb.runner import BoundedFrequencyRunner
from lb.settings import SyncSettings


class FakeTimer:
    """clock() and sleep() for the runner; advance() moves time and wakes sleepers in order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleepers: list[tuple[float, asyncio.Future]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, d: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        entry = (self.now + d, fut)
        self.sleepers.append(entry)
        try:
            await fut
        finally:
            self.sleepers.remove(entry)

    async def advance(self, d: float) -> None:
        target = self.now + d
        while True:
            for _ in range(10):  # let every ready task run
                await asyncio.sleep(0)
            due = [s for s in self.sleepers if s[0] <= target and not s[1].done()]
            if not due:
                break
            when, fut = min(due, key=lambda s: s[0])
            self.now = max(self.now, when)
            fut.set_result(None)
        self.now = target
        for _ in range(10):
            await asyncio.sleep(0)


SETTINGS = SyncSettings(min_interval=1.0, full_resync=100.0, retry_initial=0.5, retry_max=4.0)


def scenario(steps, fail_until: float = -1.0, settings: SyncSettings = SETTINGS):
    """Run the runner through ``steps`` ("run" or a number of seconds to advance); returns the calls
    as (time, full). Calls before ``fail_until`` raise."""
    calls: list[tuple[float, bool]] = []

    async def main():
        timer = FakeTimer()

        async def fn(full: bool) -> None:
            calls.append((timer.now, full))
            if timer.now < fail_until:
                raise RuntimeError("map write failed")

        r = BoundedFrequencyRunner("test", fn, settings, clock=timer.clock, sleep=timer.sleep)
        stop = asyncio.Event()
        task = asyncio.create_task(r.loop(stop))
        for step in steps:
            if step == "run":
                r.run()
            else:
                await timer.advance(step)
        stop.set()
        r.run()
        await timer.advance(10)
        await asyncio.wait_for(task, 1)
    asyncio.run(main())
    return calls


@pytest.mark.parametrize("steps, want", [
    pytest.param([0.1], [(0.0, True)], id="the first run is immediate and full"),
    pytest.param([0.1, "run", "run", "run", 5], [(0.0, True), (1.0, False)],
                 id="a burst inside the minimum interval is coalesced into one run at its end"),
    pytest.param([0.1, 3, "run", 5], [(0.0, True), (3.1, False)],
                 id="a change after the minimum interval runs at once"),
    pytest.param([0.5, "run", 0.2, "run", 0.2, "run", 5], [(0.0, True), (1.0, False)],
                 id="changes spread inside one interval still make one run"),
    pytest.param([250], [(0.0, True), (100.0, True), (200.0, True)], id="a full resync every full_resync seconds"),
    pytest.param([50, "run", 60], [(0.0, True), (50.0, False), (100.0, True)],
                 id="a partial run does not postpone the full resync"),
])
def test_runner_timing(steps, want):
    assert scenario(steps) == want


def test_failures_are_retried_with_doubling_backoff_up_to_the_cap_then_reset():
    calls = scenario([20, "run", 30], fail_until=8.0, settings=SyncSettings(
        min_interval=0.1, full_resync=100.0, retry_initial=0.5, retry_max=4.0))
    times = [t for t, _ in calls]
    # 0 fails; retries after 0.5, 1, 2, 4, 4 (cap) ... until one succeeds at or after t=8
    assert times[:6] == [0.0, 0.5, 1.5, 3.5, 7.5, 11.5]
    assert all(full for _, full in calls[:6])  # the failed first run was full: its retries are too
    # after the success, a change runs at once (no backoff left) and is partial
    assert calls[6] == (20.0, False) and len(calls) == 7


def test_retries_never_come_closer_than_the_minimum_interval():
    calls = scenario([20], fail_until=8.0)  # retry_initial 0.5 < min_interval 1.0
    assert [t for t, _ in calls] == [0.0, 1.0, 2.0, 4.0, 8.0]


def test_a_change_during_backoff_runs_after_the_minimum_interval():
    calls = scenario([0.2, "run", 5], fail_until=0.1)
    assert calls[:2] == [(0.0, True), (1.0, True)]
