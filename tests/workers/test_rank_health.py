"""A rank's health probe (the controller's health check) answers while a long step holds the engine,
where `stats` waits for it; it fails, naming the cause, when one step runs past STUCK_STEP_S and
once the engine loop has failed."""

from __future__ import annotations

import asyncio
import threading

import pytest

import workers.rank_actor as rank_actor
from tandem.request import GenerationRequest, SamplingConfig
from workers.actor_common import HandoffPath, WorkerConfig
from workers.decode import DecodeWorker
from workers.engine.engine import Role

pytestmark = pytest.mark.workers


def test_health_through_a_long_step_a_stuck_step_and_a_failed_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        w = DecodeWorker(WorkerConfig("decode-9", Role.DECODE, handoff=HandoffPath.RAY_OBJECT_STORE))
        assert await w.ready() == "decode-9/r0"
        loop = w._started()
        entered, release = threading.Event(), threading.Event()

        def long_step() -> None:  # runs under the engine lock, as every step does; then the step fails
            entered.set()
            release.wait(30)
            raise RuntimeError("kernel exploded")

        w._built.engine.step = long_step
        await w.submit(GenerationRequest("r", (1, 2, 3), SamplingConfig(max_tokens=2)))
        assert await asyncio.to_thread(entered.wait, 10)
        try:
            assert await asyncio.wait_for(w.health(), 2.0) == "decode-9/r0"  # busy, not dead
            with pytest.raises(TimeoutError):  # the old probe: stuck behind the step
                await asyncio.wait_for(asyncio.shield(w.stats()), 0.5)
            monkeypatch.setattr(rank_actor, "STUCK_STEP_S", 0.2)
            await asyncio.sleep(0.3)
            with pytest.raises(RuntimeError, match=r"decode-9/r0: one engine step has run for \d+ s"):
                await w.health()
        finally:
            release.set()
        for _ in range(300):
            if loop.error is not None:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match=r"decode-9/r0: the engine loop failed: .*kernel exploded"):
            await w.health()

    asyncio.run(go())
