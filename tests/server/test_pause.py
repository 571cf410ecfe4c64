"""vLLM's /pause modes on vroll serve's gate (no engine: the gate is plain asyncio)."""

from __future__ import annotations

import asyncio

from vroll.server.pause import PauseGate


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_every_mode_holds_new_generations_until_resume_and_wait_drains_the_old():
    async def run() -> None:
        gate, events = PauseGate(), []

        async def generation(name: str, release: asyncio.Event) -> None:
            async with gate.admit() as aborted:
                events.append(f"{name} runs")
                await release.wait()
                events.append(f"{name} done{' (aborted)' if aborted() else ''}")

        old_done = asyncio.Event()
        old = asyncio.create_task(generation("old", old_done))
        await _settle()
        await gate.pause("keep")  # answers at once, the old one still runs
        assert gate.paused and gate.inflight == 1
        new_done = asyncio.Event()
        new = asyncio.create_task(generation("new", new_done))
        waiting = asyncio.create_task(gate.pause("wait"))
        await _settle()
        assert events == ["old runs"] and not waiting.done()  # new is held; wait waits for old
        old_done.set()
        await _settle()
        assert waiting.done() and events == ["old runs", "old done"]
        gate.resume()
        await _settle()
        assert events[-1] == "new runs" and not gate.paused
        new_done.set()
        await asyncio.gather(old, new)

    asyncio.run(run())


def test_abort_marks_the_generations_in_flight_and_not_the_later_ones():
    async def run() -> None:
        gate = PauseGate()
        seen: dict[str, bool] = {}

        async def generation(name: str, release: asyncio.Event) -> None:
            async with gate.admit() as aborted:
                await release.wait()
                seen[name] = aborted()

        first_done = asyncio.Event()
        first = asyncio.create_task(generation("first", first_done))
        await _settle()
        pausing = asyncio.create_task(gate.pause("abort"))
        await _settle()
        assert not pausing.done()  # it returns once the aborted one has left
        first_done.set()
        await _settle()
        assert pausing.done() and seen == {"first": True}
        gate.resume()
        later_done = asyncio.Event()
        later_done.set()
        await generation("later", later_done)
        assert seen == {"first": True, "later": False}
        await first

    asyncio.run(run())


def test_a_pause_right_after_a_resume_holds_the_woken_requests_again():
    async def run() -> None:
        gate, admitted = PauseGate(), []
        await gate.pause("keep")

        async def generation() -> None:
            async with gate.admit():
                admitted.append(1)

        task = asyncio.create_task(generation())
        await _settle()
        gate.resume()
        await gate.pause("keep")  # before the woken waiter ran
        await _settle()
        assert admitted == []
        gate.resume()
        await task
        assert admitted == [1]

    asyncio.run(run())
