"""Real servers on 127.0.0.1 (port 0) for tests of the front doors: the HTTP app under uvicorn, with
or without TLS, inside the test's own event loop; the router's gRPC server on a loop in a thread."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import uvicorn
from fastapi import FastAPI

from orchestrator.router.frontend import Frontend
from orchestrator.router.host import TlsPaths
from orchestrator.router.server import start_server


@asynccontextmanager
async def http_server(app: FastAPI, tls: TlsPaths | None = None) -> AsyncIterator[int]:
    """Serve `app` on 127.0.0.1; yields the port; stops the server on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    kwargs = tls.for_uvicorn() if tls is not None else {}
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off", **kwargs))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


async def settle(timeout_s: float = 5.0) -> None:
    """Wait for every other task of the loop to finish (servers stopped in the background)."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        await asyncio.wait(others, timeout=timeout_s)


@contextmanager
def grpc_router(frontend: Frontend) -> Iterator[str]:
    """The router's gRPC server over `frontend`, on an event loop in a thread; yields its address."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server, port = asyncio.run_coroutine_threadsafe(start_server(frontend, port=0), loop).result(30)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
