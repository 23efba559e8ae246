"""/v1/chat/completions <-> the router's Generate in its `messages` form.

The API does not render prompts: it passes the conversation, tools and thinking switch on, and the
router renders them with the model's chat encoding (`orchestrator.router.chat`) and splits the
model's output into answer, reasoning and tool calls. Here: the body's messages and options into
the proto, and the chunks back into OpenAI's message and delta shapes (`reasoning_content`,
`tool_calls` with id, type "function" and function {name, arguments JSON text}).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from orchestrator.api.chat_schemas import ChatFields, ToolBody
from tandem.v1 import generate_pb2

_EFFORT = {None: generate_pb2.REASONING_EFFORT_UNSPECIFIED, "high": generate_pb2.REASONING_EFFORT_HIGH,
           "max": generate_pb2.REASONING_EFFORT_MAX}


def tool_to_proto(tool: ToolBody) -> generate_pb2.Tool:
    """An OpenAI function tool as the proto's Tool (parameters as JSON text, "" when absent)."""
    f = tool.function
    return generate_pb2.Tool(name=f.name, description=f.description or "",
                             parameters_json=json.dumps(f.parameters) if f.parameters is not None else "")


def fill_chat(msg: generate_pb2.GenerateRequest, body: ChatFields) -> None:
    """Put the body's conversation and chat options on `msg` (which has neither prompt nor ids)."""
    for m in body.messages:
        calls = [generate_pb2.ToolCall(id=c.id, name=c.function.name, arguments_json=c.function.arguments)
                 for c in m.tool_calls or []]
        msg.messages.append(generate_pb2.ChatMessage(
            role=m.role, content=m.text, reasoning_content=m.reasoning_content or "", tool_calls=calls,
            tool_call_id=m.tool_call_id or "", name=m.name or ""))
    tools = [tool_to_proto(t) for t in body.offered_tools]
    msg.chat.CopyFrom(generate_pb2.ChatOptions(thinking=body.thinking_on, tools=tools,
                                               reasoning_effort=_EFFORT[body.reasoning_effort]))


def _calls(calls: Sequence[generate_pb2.ToolCall], indexed: bool) -> list[dict]:
    return [{**({"index": i} if indexed else {}), "id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments_json}} for i, c in enumerate(calls)]


def assistant_message(text: str, reasoning: str, calls: Sequence[generate_pb2.ToolCall],
                      thinking: bool) -> dict:
    """The response's message: content null when the turn is only tool calls; reasoning_content
    (possibly empty) in thinking mode."""
    out: dict = {"role": "assistant", "content": text if text or not calls else None}
    if thinking:
        out["reasoning_content"] = reasoning
    if calls:
        out["tool_calls"] = _calls(calls, indexed=False)
    return out


def chat_delta(chunk: generate_pb2.GenerateChunk, first: bool) -> dict:
    """A streamed delta: the role on the first, content always, reasoning_content and tool_calls
    (with their index, as OpenAI streams them) when the chunk has some."""
    delta: dict = {"role": "assistant"} if first else {}
    delta["content"] = chunk.text
    if chunk.reasoning_text:
        delta["reasoning_content"] = chunk.reasoning_text
    if chunk.tool_calls:
        delta["tool_calls"] = _calls(chunk.tool_calls, indexed=True)
    return delta
