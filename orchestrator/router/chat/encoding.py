"""DeepSeek-V4's chat encoding: a conversation and its options -> the prompt text.

Follows the official rules shipped with the V4 checkpoints (`encoding/encoding_dsv4.py` and its
README in deepseek-ai/DeepSeek-V4-Flash and -Pro; docs/chat.md lists each rule with its source):
- the prompt is BOS, then (thinking mode with max effort) the max-effort instruction, then the turns
  concatenated with no separators;
- a system turn is its text, plus "\\n\\n" and the tools section when tools are offered; tools ride
  on the first system turn (an empty one is put first when the conversation has none);
- consecutive user and tool turns merge into one user turn: `<｜User｜>` then its parts joined by
  "\\n\\n", a tool result as `<tool_result>...</tool_result>`, the results of one assistant's calls
  in the order of those calls;
- an assistant turn is [reasoning + `</think>`] + content + ["\\n\\n" + DSML call block] + EOS;
- after a user turn that an assistant answers (or that ends the conversation) comes `<｜Assistant｜>`
  and `<think>` (thinking) or `</think>` (chat);
- thinking mode drops earlier turns' reasoning: a user turn before the last gets `</think>` and the
  assistant after it keeps no reasoning. With tools offered nothing is dropped: every turn keeps
  its reasoning and every user turn opens `<think>`.

`render` returns the prompt WITHOUT the leading BOS: admission adds the tokenizer's BOS id, which
is how the checkpoint's tokenizer spells `<｜begin▁of▁sentence｜>`.
A checkpoint's `tokenizer_config.json` chat template is not used: V4 ships these rules as Python,
not as a Jinja template, and rendering them here keeps the router free of a template engine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

from orchestrator.router.chat.conversation import (
    ChatOptions,
    Message,
    ReasoningEffort,
    Role,
    Tool,
    ToolCall,
    conversation_from_proto,
)
from orchestrator.router.chat.dsml import BLOCK_CLOSE, BLOCK_OPEN, DSML, encode_block, to_json
from tandem.v1 import generate_pb2

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
TOOL_RESULT_OPEN = "<tool_result>"
TOOL_RESULT_CLOSE = "</tool_result>"

MAX_EFFORT_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the "
    "root cause, rigorously stress-testing your logic against all potential paths, edge cases, and "
    "adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

_CALL_EXAMPLE = "\n".join([
    BLOCK_OPEN,
    f'<{DSML}invoke name="$TOOL_NAME">',
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>',
    "...",
    f"</{DSML}invoke>",
    f'<{DSML}invoke name="$TOOL_NAME2">',
    "...",
    f"</{DSML}invoke>",
    BLOCK_CLOSE,
])


def tools_section(tools: Sequence[Tool]) -> str:
    """The tools part of the system prompt: the call syntax, then one JSON schema line per tool."""
    schemas = "\n".join(to_json(_schema(t)) for t in tools)
    return (
        "## Tools\n\n"
        "You have access to a set of tools to help answer the user's question. You can invoke tools by "
        f'writing a "{BLOCK_OPEN}" block like the following:\n\n'
        f"{_CALL_EXAMPLE}\n\n"
        'String parameters should be specified as is and set `string="true"`. For all other types (numbers, '
        'booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
        f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning "
        f"inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
        f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
        "### Available Tool Schemas\n\n"
        f"{schemas}\n\n"
        "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
    )


def _schema(tool: Tool) -> dict[str, object]:
    """The OpenAI function object of a tool (name, description, parameters; empty ones left out)."""
    out: dict[str, object] = {"name": tool.name}
    if tool.description:
        out["description"] = tool.description
    if tool.parameters_json:
        out["parameters"] = json.loads(tool.parameters_json)
    return out


@dataclass(frozen=True)
class _Part:
    """A piece of a merged user turn: the user's text, or a tool's result (result_of = call id)."""

    text: str
    is_result: bool
    result_of: str = ""


@dataclass(frozen=True)
class _Turn:
    """A turn as the encoding sees it: user and tool messages already merged into user turns."""

    role: Role
    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    parts: tuple[_Part, ...] = ()  # user turns
    tools: tuple[Tool, ...] = ()  # the first system turn, when tools are offered


def prompt_of(msg: generate_pb2.GenerateRequest) -> str:
    """The prompt (without BOS) of a request in its `messages` form; RequestError names a bad field."""
    messages, options = conversation_from_proto(msg)
    return render(messages, options)


def render(messages: Sequence[Message], options: ChatOptions) -> str:
    """The V4 prompt (without BOS) asking the model for the next assistant turn of `messages`."""
    turns = _turns(messages, options.tools)
    keep_all_reasoning = bool(options.tools)
    last_user = max((i for i, t in enumerate(turns) if t.role is Role.USER), default=-1)
    out = [MAX_EFFORT_PREFIX] if options.thinking and options.effort is ReasoningEffort.MAX else []
    for i, t in enumerate(turns):
        if t.role is Role.SYSTEM:
            out.append(t.content + ("\n\n" + tools_section(t.tools) if t.tools else ""))
        elif t.role is Role.USER:
            out.append(USER + "\n\n".join(p.text for p in t.parts))
        else:
            keeps = options.thinking and (keep_all_reasoning or i > last_user)
            out.append((t.reasoning + THINK_END if keeps else "") + t.content + _calls(t) + EOS)
        answered = i + 1 == len(turns) or turns[i + 1].role is Role.ASSISTANT
        if t.role is Role.USER and answered:
            opens = options.thinking and (keep_all_reasoning or i >= last_user)
            out.append(ASSISTANT + (THINK_START if opens else THINK_END))
    return "".join(out)


def _calls(t: _Turn) -> str:
    """The turn's call block. Arguments that are not a JSON object raise DsmlError; requests never
    get here with them (conversation_from_proto refuses them, naming the message)."""
    if not t.tool_calls:
        return ""
    return "\n\n" + encode_block([(c.name, c.arguments_json) for c in t.tool_calls])


def _turns(messages: Sequence[Message], tools: tuple[Tool, ...]) -> list[_Turn]:
    """Merge user and tool messages into user turns, order tool results by their calls, attach tools."""
    turns: list[_Turn] = []
    order: dict[str, int] = {}  # call id -> position in the latest assistant turn that made calls
    for m in messages:
        if m.role in (Role.USER, Role.TOOL):
            part = (_Part(TOOL_RESULT_OPEN + m.content + TOOL_RESULT_CLOSE, True, m.tool_call_id)
                    if m.role is Role.TOOL else _Part(m.content, False))
            if turns and turns[-1].role is Role.USER:
                turns[-1] = replace(turns[-1], parts=(*turns[-1].parts, part))
            else:
                turns.append(_Turn(Role.USER, parts=(part,)))
            continue
        if turns and turns[-1].role is Role.USER:
            turns[-1] = _ordered(turns[-1], order)
        if m.role is Role.ASSISTANT and m.tool_calls:
            order = {c.id: k for k, c in enumerate(m.tool_calls) if c.id}
        turns.append(_Turn(m.role, m.content, m.reasoning, m.tool_calls))
    if turns and turns[-1].role is Role.USER:
        turns[-1] = _ordered(turns[-1], order)
    if tools:
        if turns and turns[0].role is Role.SYSTEM:
            turns[0] = replace(turns[0], tools=tools)
        else:
            turns.insert(0, _Turn(Role.SYSTEM, tools=tools))
    return turns


def _ordered(turn: _Turn, order: dict[str, int]) -> _Turn:
    """The turn with its results sorted (stably) by their call's position; an unknown id counts as
    position 0; the user's own text parts stay where they are."""
    slots = [k for k, p in enumerate(turn.parts) if p.is_result]
    if len(slots) < 2 or not order:
        return turn
    ranked = iter(sorted((turn.parts[k] for k in slots), key=lambda p: order.get(p.result_of, 0)))
    return replace(turn, parts=tuple(next(ranked) if p.is_result else p for p in turn.parts))
