"""A rank's health probe (the controller's health check) answers while a long step holds the engine,
where `stats` waits for it, and fails, naming the cause, once the engine loop has failed."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tandem.request import GenerationRequest, SamplingConfig
from workers.actor_common import HandoffPath, WorkerConfig
from workers.decode import DecodeWorker
from workers.engine.engine import Role

pytestmark = pytest.mark.workers


def test_health_answers_during_a_long_step_and_fails_with_the_engine_loop() -> None:
    async def go() -> None:
        w = DecodeWorker(WorkerConfig("decode-9", Role.DECODE, handoff=HandoffPath.RAY_OBJECT_STORE))
        assert await w.ready() == "decode-9/r0"
        loop = w._started()
        held, release = threading.Event(), threading.Event()

        def long_step() -> None:  # what a multi-second prefill step does to the lock
            with loop._lock:
                held.set()
                release.wait(30)

        t = threading.Thread(target=long_step)
        t.start()
        held.wait(10)
        try:
            assert await asyncio.wait_for(w.health(), 2.0) == "decode-9/r0"
            with pytest.raises(TimeoutError):  # the old probe: stuck behind the step
                await asyncio.wait_for(asyncio.shield(w.stats()), 0.5)
        finally:
            release.set()
            await asyncio.to_thread(t.join)

        def broken_step() -> None:
            raise RuntimeError("kernel exploded")

        w._built.engine.step = broken_step  # a real failure of the loop's next step
        await w.submit(GenerationRequest("r", (1, 2, 3), SamplingConfig(max_tokens=2)))
        for _ in range(200):
            if loop.error is not None:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match=r"decode-9/r0: the engine loop failed: .*kernel exploded"):
            await w.health()

    asyncio.run(go())
