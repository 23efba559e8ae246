"""DeepSeek-V4's tool-call markup (DSML): writing an assistant's calls, reading the model's back.

A block of calls (docs/chat.md has the source):

    <｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

One parameter per top-level key of the arguments object, in order: a string value is written as is
with string="true"; any other value as compact JSON text (`json.dumps`, non-ASCII kept) with
string="false". Reading inverts that: the arguments come back as the JSON object text
`json.dumps({...}, ensure_ascii=False)`, equal to what was written for canonical JSON input.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

DSML = "｜DSML｜"
BLOCK_OPEN = f"<{DSML}tool_calls>"
BLOCK_CLOSE = f"</{DSML}tool_calls>"
_INVOKE_OPEN = f'<{DSML}invoke name="'
_INVOKE_CLOSE = f"</{DSML}invoke>"
_PARAM_OPEN = f'<{DSML}parameter name="'
_PARAM_CLOSE = f"</{DSML}parameter>"
_STRING_FLAG = {' string="true">': True, ' string="false">': False}


class DsmlError(ValueError):
    """A tool-call block that does not follow the markup; str() says where and why."""


@dataclass(frozen=True)
class ParsedCall:
    """A call read from model output; arguments as JSON object text."""

    name: str
    arguments_json: str


def to_json(value: object) -> str:
    """The encoding's JSON text: default separators, non-ASCII characters kept."""
    return json.dumps(value, ensure_ascii=False)


def encode_block(calls: Sequence[tuple[str, str]]) -> str:
    """The block for (name, arguments JSON object text) pairs; arguments must be a JSON object."""
    invokes = []
    for name, arguments_json in calls:
        arguments = json.loads(arguments_json)
        if not isinstance(arguments, dict):
            raise DsmlError(f"arguments of {name!r} must be a JSON object, got {type(arguments).__name__}")
        params = [f'{_PARAM_OPEN}{key}" string="{"true" if isinstance(v, str) else "false"}">'
                  f"{v if isinstance(v, str) else to_json(v)}{_PARAM_CLOSE}" for key, v in arguments.items()]
        invokes.append(f'{_INVOKE_OPEN}{name}">\n' + "\n".join(params) + f"\n{_INVOKE_CLOSE}")
    return f"{BLOCK_OPEN}\n" + "\n".join(invokes) + f"\n{BLOCK_CLOSE}"


def parse_block_body(body: str) -> tuple[ParsedCall, ...]:
    """The calls of the text between BLOCK_OPEN and BLOCK_CLOSE. Whitespace between elements is
    free; anything else out of place, a duplicate parameter, or a string="false" value that is not
    JSON raises DsmlError."""
    calls: list[ParsedCall] = []
    pos = _skip_space(body, 0)
    while pos < len(body):
        name, pos = _quoted(body, pos, _INVOKE_OPEN, '">', "invoke")
        arguments: dict[str, object] = {}
        pos = _skip_space(body, pos)
        while not body.startswith(_INVOKE_CLOSE, pos):
            key, pos = _quoted(body, pos, _PARAM_OPEN, '"', f"parameter of {name!r}")
            flag = next((f for f in _STRING_FLAG if body.startswith(f, pos)), None)
            if flag is None:
                raise DsmlError(f"parameter {key!r} of {name!r}: expected string=\"true|false\"> at {pos}")
            end = body.find(_PARAM_CLOSE, pos + len(flag))
            if end < 0:
                raise DsmlError(f"parameter {key!r} of {name!r} is not closed")
            raw = body[pos + len(flag):end]
            if key in arguments:
                raise DsmlError(f"parameter {key!r} of {name!r} given twice")
            arguments[key] = raw if _STRING_FLAG[flag] else _json_value(raw, key, name)
            pos = _skip_space(body, end + len(_PARAM_CLOSE))
        calls.append(ParsedCall(name, to_json(arguments)))
        pos = _skip_space(body, pos + len(_INVOKE_CLOSE))
    if not calls:
        raise DsmlError("a tool-call block with no invoke")
    return tuple(calls)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _quoted(text: str, pos: int, opener: str, closer: str, what: str) -> tuple[str, int]:
    """The name after `opener` up to `closer`, and the position after `closer`."""
    if not text.startswith(opener, pos):
        raise DsmlError(f"expected {opener!r} ({what}) at {pos}, got {text[pos:pos + 40]!r}")
    start = pos + len(opener)
    end = text.find(closer, start)
    if end < 0 or "\n" in text[start:end] or not text[start:end]:
        raise DsmlError(f"{what}: no name closed by {closer!r} after {pos}")
    return text[start:end], end + len(closer)


def _json_value(raw: str, key: str, name: str) -> object:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DsmlError(f"parameter {key!r} of {name!r} is marked string=\"false\" but is not JSON: "
                        f"{exc.msg}") from None
    except RecursionError:
        raise DsmlError(f"parameter {key!r} of {name!r}: JSON nested too deeply") from None
