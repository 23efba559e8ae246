"""The chunks of a `messages` request, with the model's text split by the V4 output rules.

Wraps the router's chunk stream: each chunk keeps its token ids, usage and timing; its `text`
becomes the answer only and `reasoning_text` the reasoning (thinking mode). Text held back while a
marker is undecided comes out in a later chunk, at the latest the last one, which also carries the
parsed `tool_calls` (ids `call_` + 24 hex digits, derived from the request id and the call's index).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

from orchestrator.router.chat.dsml import ParsedCall
from orchestrator.router.chat.parser import OutputParser, Parsed
from tandem.v1 import generate_pb2


def call_id(request_id: str, index: int) -> str:
    """A tool call's id: stable for a request id and the call's position in the answer."""
    digest = hashlib.blake2b(f"{request_id}/{index}".encode(), digest_size=12).hexdigest()
    return f"call_{digest}"


async def split_chat_output(chunks: AsyncIterator[generate_pb2.GenerateChunk], *, thinking: bool,
                            tools: bool) -> AsyncIterator[generate_pb2.GenerateChunk]:
    """Re-yield `chunks` with text split into answer / reasoning and tool calls on the last chunk.

    `tools`: whether tools were offered (without them a call block is plain answer text)."""
    parser = OutputParser(thinking=thinking, tools=tools)
    calls: list[ParsedCall] = []
    try:
        async for chunk in chunks:
            part = parser.push(chunk.text)
            last = chunk.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED
            if last:
                part = part + parser.finish()
            calls.extend(part.calls)
            _apply(chunk, part)
            if last:
                chunk.tool_calls.extend(generate_pb2.ToolCall(id=call_id(chunk.request_id, i), name=c.name,
                                                              arguments_json=c.arguments_json)
                                        for i, c in enumerate(calls))
            yield chunk
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


def _apply(chunk: generate_pb2.GenerateChunk, part: Parsed) -> None:
    chunk.text = part.answer
    chunk.reasoning_text = part.reasoning
