"""The chat options of `tandem generate`: a conversation from the command line, tools from a file,
and a text rendering of the answer.

- `--message ROLE:TEXT` (repeatable, in order), with `--system TEXT` put first and `--user TEXT`
  put last; ROLE is system, developer, user or assistant (tool results need a call id, which the
  command line does not carry). The last turn must be the user's: the model answers it.
- `--tools FILE`: a JSON array of OpenAI function tools (`{"type": "function", "function": {"name",
  "description", "parameters"}}`), checked entry by entry as the HTTP API and the router check
  them; an error names the file and the entry.
- Text output: the reasoning dimmed, then the answer, then one line per tool call.

Every mistake is a `ChatOptionError`: one line naming the option (or the file and entry).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError
from rich.color import ColorSystem
from rich.console import Console
from rich.style import Style

from orchestrator.api.chat import tool_to_proto
from orchestrator.api.chat_schemas import ToolBody
from orchestrator.router.chat.conversation import ReasoningEffort, conversation_from_proto
from orchestrator.router.client import tool_call_line
from tandem.request import RequestError
from tandem.v1 import generate_pb2


class ChatOptionError(ValueError):
    """A bad chat option of the command line; str() is the one-line message."""


class CliRole(enum.Enum):
    """The roles a `--message` may have."""

    SYSTEM = "system"
    DEVELOPER = "developer"
    USER = "user"
    ASSISTANT = "assistant"


_ROLE_NAMES = ", ".join(r.value for r in CliRole)


def parse_message(text: str) -> generate_pb2.ChatMessage:
    """`ROLE:TEXT` -> a ChatMessage (the text after the first colon, as is)."""
    role, colon, content = text.partition(":")
    if not colon:
        raise ChatOptionError(f"--message {text!r}: expected ROLE:TEXT with ROLE one of {_ROLE_NAMES}")
    try:
        cli_role = CliRole(role.strip().lower())
    except ValueError:
        raise ChatOptionError(f"--message {text!r}: role {role!r} is not one of {_ROLE_NAMES}") from None
    return generate_pb2.ChatMessage(role=cli_role.value, content=content)


def conversation(system: str | None, messages: Sequence[str],
                 user: str | None) -> list[generate_pb2.ChatMessage]:
    """The turns in order: --system, each --message, --user. Empty when none was given."""
    turns = [] if system is None else [generate_pb2.ChatMessage(role=CliRole.SYSTEM.value, content=system)]
    turns += [parse_message(m) for m in messages]
    if user is not None:
        turns.append(generate_pb2.ChatMessage(role=CliRole.USER.value, content=user))
    if turns and turns[-1].role != CliRole.USER.value:
        raise ChatOptionError(f"the last turn must be the user's (the model answers it), not "
                              f"{turns[-1].role!r}: end with --user TEXT or --message user:TEXT")
    return turns


def parse_effort(text: str) -> ReasoningEffort:
    """`high` or `max`."""
    try:
        return ReasoningEffort(text.strip().lower())
    except ValueError:
        names = " or ".join(e.value for e in ReasoningEffort)
        raise ChatOptionError(f"--reasoning-effort {text!r}: expected {names}") from None


def load_tools(path: Path) -> list[generate_pb2.Tool]:
    """The function tools of a JSON file (an array of OpenAI tool objects), each checked."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ChatOptionError(f"--tools {path}: cannot read it ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ChatOptionError(f"--tools {path}: not valid JSON ({exc})") from None
    if not isinstance(entries, list) or not entries:
        raise ChatOptionError(f"--tools {path}: expected a non-empty JSON array of tool objects")
    return [_tool(path, i, entry) for i, entry in enumerate(entries)]


def _tool(path: Path, i: int, entry: object) -> generate_pb2.Tool:
    where = f"--tools {path}: entry {i}"
    try:
        body = ToolBody.model_validate(entry)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "(the entry)"
        raise ChatOptionError(f"{where}: {loc}: {first['msg']}") from None
    tool = tool_to_proto(body)
    # The router's own rules (function name, parameters a JSON object), checked before sending.
    probe = generate_pb2.GenerateRequest(messages=[generate_pb2.ChatMessage(role="user")],
                                         chat=generate_pb2.ChatOptions(tools=[tool]))
    try:
        conversation_from_proto(probe)
    except RequestError as exc:
        raise ChatOptionError(f"{where}: {str(exc).removeprefix('chat.tools[0].')}") from None
    return tool


_DIM = Style(dim=True)


class ChatPrinter:
    """Writes a chat's stream as text: reasoning dimmed as it comes, then the answer; `close`
    ends the answer's line and lists the tool calls of the last chunk."""

    def __init__(self, console: Console) -> None:
        self._out = console
        self._reasoned = False
        self._answered = False
        self._calls: list[generate_pb2.ToolCall] = []

    def chunk(self, chunk: generate_pb2.GenerateChunk) -> None:
        if chunk.reasoning_text:
            self._reasoned = True
            self._write(chunk.reasoning_text, _DIM)
        if chunk.text:
            if self._reasoned and not self._answered:
                self._write("\n\n", None)  # the answer starts on its own paragraph
            self._answered = True
            self._write(chunk.text, None)
        self._calls += chunk.tool_calls

    def close(self) -> None:
        self._write("\n", None)
        for call in self._calls:
            self._write(tool_call_line(call) + "\n", None)

    def _write(self, text: str, style: Style | None) -> None:
        # The model's text goes out byte for byte: rich's print would expand tabs, drop control
        # characters and turn :names: into emoji. Only the SGR codes come from rich, and only when
        # the console has colour (a terminal, FORCE_COLOR; not NO_COLOR nor a pipe).
        if style is not None and self._out.color_system is not None:
            text = style.render(text, color_system=ColorSystem.STANDARD)
        self._out.file.write(text)
        self._out.file.flush()
