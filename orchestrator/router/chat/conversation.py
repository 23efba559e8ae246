"""A conversation as frozen values, validated from `tandem.v1.GenerateRequest.messages` / `.chat`.

Every refusal is a `RequestError` naming the field (`messages[2].role`, `chat.tools[0].name`, ...).
Rules checked here, before any rendering:
- roles are system, developer, user, assistant or tool; `developer` is the OpenAI name of the
  system role and is rendered as one (DeepSeek-V4's own `developer` role belongs to its internal
  search pipeline, which the official API does not accept);
- only assistant turns carry `reasoning_content` and `tool_calls`; only tool turns `tool_call_id`;
- a tool call's arguments are a JSON object (they are rendered parameter by parameter);
- a tool's parameters are a JSON object (its JSON Schema);
- the conversation ends with a user or tool turn: the model writes the next assistant turn.
`ChatMessage.name` has no place in the V4 encoding; it is accepted and not rendered.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass

from tandem.request import RequestError
from tandem.v1 import generate_pb2

MAX_MESSAGES = 4096
MAX_TOOLS = 512
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


class Role(enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


_ROLES = {"system": Role.SYSTEM, "developer": Role.SYSTEM, "user": Role.USER, "assistant": Role.ASSISTANT,
          "tool": Role.TOOL}


class ReasoningEffort(enum.Enum):
    """The effort levels of the V4 encoding; only MAX changes the prompt."""

    HIGH = "high"
    MAX = "max"


@dataclass(frozen=True)
class ToolCall:
    """A call an assistant turn made: arguments as JSON object text."""

    id: str
    name: str
    arguments_json: str


@dataclass(frozen=True)
class Tool:
    """A function the model may call; `parameters_json` is its JSON Schema (object) or empty."""

    name: str
    description: str = ""
    parameters_json: str = ""


@dataclass(frozen=True)
class Message:
    role: Role
    content: str = ""
    reasoning: str = ""  # assistant turns only
    tool_calls: tuple[ToolCall, ...] = ()  # assistant turns only
    tool_call_id: str = ""  # tool turns only: the call this result answers


@dataclass(frozen=True)
class ChatOptions:
    """How the conversation is rendered and how the output is read back."""

    thinking: bool = False
    tools: tuple[Tool, ...] = ()
    effort: ReasoningEffort = ReasoningEffort.HIGH

    def __post_init__(self) -> None:
        if self.effort is ReasoningEffort.MAX and not self.thinking:
            raise RequestError("chat.reasoning_effort", "max effort needs thinking mode (chat.thinking)")


def _object_json(text: str, field: str) -> None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(field, f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:
        raise RequestError(field, "JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise RequestError(field, f"must be a JSON object, got {type(value).__name__}")


def _message(i: int, m: generate_pb2.ChatMessage) -> Message:
    where = f"messages[{i}]"
    role = _ROLES.get(m.role)
    if role is None:
        raise RequestError(f"{where}.role", f"{m.role!r} is not one of {sorted(_ROLES)}")
    if m.reasoning_content and role is not Role.ASSISTANT:
        raise RequestError(f"{where}.reasoning_content", f"only assistant turns reason, not {m.role!r}")
    if m.tool_calls and role is not Role.ASSISTANT:
        raise RequestError(f"{where}.tool_calls", f"only assistant turns carry tool calls, not {m.role!r}")
    if m.tool_call_id and role is not Role.TOOL:
        raise RequestError(f"{where}.tool_call_id", f"only tool turns answer a call, not {m.role!r}")
    calls = []
    for j, c in enumerate(m.tool_calls):
        if not _TOOL_NAME.fullmatch(c.name):
            raise RequestError(f"{where}.tool_calls[{j}].name", f"{c.name!r} is not a function name")
        _object_json(c.arguments_json or "{}", f"{where}.tool_calls[{j}].arguments")
        calls.append(ToolCall(c.id, c.name, c.arguments_json or "{}"))
    return Message(role, m.content, m.reasoning_content, tuple(calls), m.tool_call_id)


def _tool(i: int, t: generate_pb2.Tool) -> Tool:
    if not _TOOL_NAME.fullmatch(t.name):
        raise RequestError(f"chat.tools[{i}].name", f"{t.name!r} is not a function name "
                                                    f"(1-128 of letters, digits, _ . : -)")
    if t.parameters_json:
        _object_json(t.parameters_json, f"chat.tools[{i}].parameters")
    return Tool(t.name, t.description, t.parameters_json)


_EFFORT = {generate_pb2.REASONING_EFFORT_UNSPECIFIED: ReasoningEffort.HIGH,
           generate_pb2.REASONING_EFFORT_HIGH: ReasoningEffort.HIGH,
           generate_pb2.REASONING_EFFORT_MAX: ReasoningEffort.MAX}


def conversation_from_proto(msg: generate_pb2.GenerateRequest) -> tuple[tuple[Message, ...], ChatOptions]:
    """The validated conversation and options of a request in its `messages` form."""
    if len(msg.messages) > MAX_MESSAGES:
        raise RequestError("messages", f"at most {MAX_MESSAGES} messages, got {len(msg.messages)}")
    if len(msg.chat.tools) > MAX_TOOLS:
        raise RequestError("chat.tools", f"at most {MAX_TOOLS} tools, got {len(msg.chat.tools)}")
    if not msg.messages:
        raise RequestError("messages", "the conversation is empty")
    messages = tuple(_message(i, m) for i, m in enumerate(msg.messages))
    last = len(messages) - 1
    if messages[last].role not in (Role.USER, Role.TOOL):
        why = ("the conversation must end with a user or tool turn for the model to answer, "
               f"not {msg.messages[last].role!r}")
        raise RequestError(f"messages[{last}].role", why)
    effort = _EFFORT.get(msg.chat.reasoning_effort)
    if effort is None:
        raise RequestError("chat.reasoning_effort", f"unknown value {msg.chat.reasoning_effort}")
    tools = tuple(_tool(i, t) for i, t in enumerate(msg.chat.tools))
    return messages, ChatOptions(thinking=msg.chat.thinking, tools=tools, effort=effort)
