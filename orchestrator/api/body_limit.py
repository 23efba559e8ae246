"""An ASGI middleware that refuses HTTP request bodies over a size limit with 413.

A declared Content-Length over the limit is refused before any byte of the body is read; a body
without one (chunked) is read up to the limit and refused as soon as it passes it. Bodies under the
limit are handed to the app unchanged (buffered here, then replayed), so the app never sees a
partial body. The 413 is OpenAI-shaped and names the limit.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """Wraps an ASGI app; `max_bytes` bounds each HTTP request body (limits.max_request_bytes)."""

    def __init__(self, app: App, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"BodyLimit.max_bytes = {max_bytes}: must be >= 1")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await self._refuse(send, 400, f"content-length {declared[:32]!r} is not an integer")
                return
            if size > self.max_bytes:
                await self._too_large(send, size)
                return
        messages: list[Message] = []
        total = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client went away: let the app see it
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                await self._too_large(send, total)
                return
            if not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replayed() -> Message:
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)

    async def _too_large(self, send: Send, size: int) -> None:
        await self._refuse(send, 413, f"limits.max_request_bytes: the body has at least {size} bytes "
                                      f"(limit {self.max_bytes})")

    @staticmethod
    async def _refuse(send: Send, status: int, message: str) -> None:
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                     "param": "max_request_bytes" if status == 413 else None,
                                     "code": None}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
