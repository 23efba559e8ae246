"""The V4 output parser: reasoning / answer / tool calls from streamed text.

Round trips go through the encoder: an assistant turn rendered by the official rules is what the
model writes, so parsing it must give back the turn's reasoning, content and calls. Every split
of the text into deltas must parse the same as the whole text, with no marker fragment leaking.
"""

from __future__ import annotations

import json
import logging

import pytest

from orchestrator.router.chat.conversation import conversation_from_proto
from orchestrator.router.chat.encoding import render
from orchestrator.router.chat.parser import OutputParser, Parsed
from tandem.v1 import generate_pb2

pytestmark = pytest.mark.router

EOS = "<｜end▁of▁sentence｜>"
CALLS = [("c1", "get_weather", json.dumps({"location": "Zürich", "days": 3}, ensure_ascii=False)),
         ("c2", "search", json.dumps({"query": "a </think> b", "filters": {"lang": ["de", "fr"]}, "safe": False}))]


def rendered_turn(thinking: bool, reasoning: str, content: str, calls: list) -> str:
    """What the model wrote for an assistant turn: the encoder's rendering of it, up to its EOS."""
    tool = generate_pb2.Tool(name="get_weather")
    req = generate_pb2.GenerateRequest(
        messages=[generate_pb2.ChatMessage(role="user", content="q"),
                  generate_pb2.ChatMessage(role="assistant", content=content, reasoning_content=reasoning,
                                           tool_calls=[generate_pb2.ToolCall(id=i, name=n, arguments_json=a)
                                                       for i, n, a in calls]),
                  generate_pb2.ChatMessage(role="user", content="next")],
        chat=generate_pb2.ChatOptions(thinking=thinking, tools=[tool]))
    text = render(*conversation_from_proto(req))
    opener = "<｜Assistant｜><think>" if thinking else "<｜Assistant｜></think>"
    start = text.index(opener) + len(opener)
    return text[start:text.index(EOS, start)]


def parse(pieces: list[str], *, thinking: bool, tools: bool = True) -> tuple[list[Parsed], Parsed]:
    p = OutputParser(thinking=thinking, tools=tools)
    steps = [p.push(x) for x in pieces] + [p.finish()]
    total = Parsed()
    for s in steps:
        total = total + s
    return steps, total


@pytest.mark.parametrize("thinking", [True, False])
def test_round_trip_of_an_assistant_turn_with_calls(thinking: bool) -> None:
    reasoning = "The user wants weather; call both tools." if thinking else ""
    text = rendered_turn(thinking, reasoning, "Let me check.", CALLS)
    _, got = parse([text], thinking=thinking)
    assert got.reasoning == reasoning
    assert got.answer == "Let me check."
    assert [(c.name, json.loads(c.arguments_json)) for c in got.calls] == [(n, json.loads(a)) for _, n, a in CALLS]
    assert [c.arguments_json for c in got.calls] == [a for _, _, a in CALLS]  # canonical JSON comes back exact


@pytest.mark.parametrize("thinking", [True, False])
def test_every_split_point_parses_like_the_whole(thinking: bool) -> None:
    text = rendered_turn(thinking, "Think </ hard" if thinking else "", "Answer with \n\n newlines <｜ and", CALLS)
    _, whole = parse([text], thinking=thinking)
    for cut in range(1, len(text)):
        steps, got = parse([text[:cut], text[cut:]], thinking=thinking)
        assert got == whole, cut
        for s in steps:  # no fragment of a marker ever reaches reasoning or answer
            assert "</think" not in s.reasoning and "｜DSML｜" not in s.answer and "DSML" not in s.reasoning


def test_character_by_character_stream() -> None:
    text = rendered_turn(True, "r", "", CALLS[:1])
    steps, got = parse(list(text), thinking=True)
    assert got.reasoning == "r" and got.answer == "" and [c.name for c in got.calls] == ["get_weather"]
    closed_at = next(i for i, s in enumerate(steps) if s.calls)
    assert closed_at == len(text) - 1  # the call is complete exactly when the block's last character arrives


def test_malformed_block_comes_back_as_text_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    block = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
             '<｜DSML｜parameter name="x" string="false">{not json</｜DSML｜parameter>\n'
             '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
    with caplog.at_level(logging.DEBUG, logger="orchestrator.router.chat.parser"):
        _, got = parse(["Sure.", block[:20], block[20:]], thinking=False)
    assert got.calls == () and got.answer == "Sure." + block
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "malformed tool-call block" in warned[0] and "'x'" not in warned[0]
    assert any("'x'" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)  # details


@pytest.mark.parametrize("body", [
    '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">1</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="a" string="true">2</｜DSML｜parameter>\n</｜DSML｜invoke>',  # duplicate
    '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="maybe">1</｜DSML｜parameter>\n</｜DSML｜invoke>',
    '<｜DSML｜invoke name="f">\nstray text\n</｜DSML｜invoke>',
    "",  # a block with no call
    '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="false">' + "[" * 100_000
    + '</｜DSML｜parameter>\n</｜DSML｜invoke>',  # JSON nested past the recursion limit
])
def test_other_malformed_blocks_are_text(body: str) -> None:
    block = "<｜DSML｜tool_calls>\n" + body + "\n</｜DSML｜tool_calls>"
    _, got = parse(["x", block], thinking=False)
    assert got.calls == () and got.answer == "x" + block


def test_stream_ending_inside_a_block_returns_it_as_text(caplog: pytest.LogCaptureFixture) -> None:
    cut = '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">1'
    with caplog.at_level(logging.WARNING):
        _, got = parse(["ok", cut], thinking=False)
    assert got.answer == "ok" + cut and got.calls == ()
    assert "ended inside a tool-call block" in caplog.text


def test_thinking_without_end_is_all_reasoning() -> None:
    _, got = parse(["still thinking </th", "ink"[:2]], thinking=True)
    assert got.reasoning == "still thinking </thin" and got.answer == ""


def test_without_tools_the_markup_is_plain_answer() -> None:
    text = rendered_turn(False, "", "A", CALLS[:1])
    _, got = parse([text], thinking=False, tools=False)
    assert got.answer == text and got.calls == ()


def test_held_back_newlines_are_flushed_at_the_end() -> None:
    steps, got = parse(["line\n\n"], thinking=False)
    assert steps[0].answer == "line" and steps[1].answer == "\n\n" and got.answer == "line\n\n"


def test_a_block_without_the_blank_line_is_read_too() -> None:
    text = ('Calling.<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
    _, got = parse([text], thinking=False)
    assert got.answer == "Calling." and [(c.name, c.arguments_json) for c in got.calls] == [("f", "{}")]
