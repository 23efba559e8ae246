"""DeepSeek-V4 chat encoding: prompts rendered from conversations, checked against strings written
by hand from the official rules (deepseek-ai/DeepSeek-V4-*/encoding, see docs/chat.md), and the
refusals that name the offending field.

The expected strings spell every marker out literally: they do not reuse the module's constants.
"""

from __future__ import annotations

import json

import pytest

from orchestrator.router.chat.conversation import ChatOptions, conversation_from_proto
from orchestrator.router.chat.encoding import render
from tandem.request import RequestError
from tandem.v1 import generate_pb2

pytestmark = pytest.mark.router

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"

WEATHER = {"type": "object", "properties": {"location": {"type": "string", "description": "The city name"}},
           "required": ["location"]}
# The tools section exactly as the official README prints it, for the one tool above.
TOOLS_SECTION = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{"name": "get_weather", "description": "Get the weather", "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "The city name"}}, "required": ["location"]}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""  # noqa: E501
MAX_EFFORT = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your thinking "
    "and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic "
    "against all potential paths, edge cases, and adversarial scenarios.\nExplicitly write out your entire "
    "deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis "
    "to ensure absolutely no assumption is left unchecked.\n\n")


def msg(role: str, content: str = "", **kw: object) -> generate_pb2.ChatMessage:
    calls = [generate_pb2.ToolCall(id=i, name=n, arguments_json=a) for i, n, a in kw.pop("calls", [])]
    return generate_pb2.ChatMessage(role=role, content=content, tool_calls=calls, **kw)


def request(*messages: generate_pb2.ChatMessage, thinking: bool = False, tools: bool = False,
            effort: int = 0) -> generate_pb2.GenerateRequest:
    tool = generate_pb2.Tool(name="get_weather", description="Get the weather", parameters_json=json.dumps(WEATHER))
    chat = generate_pb2.ChatOptions(thinking=thinking, tools=[tool] if tools else [], reasoning_effort=effort)
    return generate_pb2.GenerateRequest(messages=messages, chat=chat)


def prompt(req: generate_pb2.GenerateRequest) -> str:
    """The full official prompt: BOS (added by admission as the tokenizer's id) plus the rendering."""
    return BOS + render(*conversation_from_proto(req))


def test_readme_quick_start_thinking() -> None:
    req = request(msg("system", "You are a helpful assistant."), msg("user", "What is 2+2?"), thinking=True)
    assert prompt(req) == BOS + "You are a helpful assistant." + U + "What is 2+2?" + A + "<think>"


def test_chat_mode_multi_turn_closes_thinking_at_each_assistant() -> None:
    req = request(msg("system", "Be brief."), msg("user", "hi"), msg("assistant", "Hello!"), msg("user", "2+2?"))
    assert prompt(req) == (BOS + "Be brief." + U + "hi" + A + "</think>" + "Hello!" + EOS
                           + U + "2+2?" + A + "</think>")


def test_thinking_mode_drops_earlier_reasoning() -> None:
    req = request(msg("user", "hello"), msg("assistant", "Hello! I am DeepSeek.", reasoning_content="thinking..."),
                  msg("user", "1+1=?"), thinking=True)
    assert prompt(req) == (BOS + U + "hello" + A + "</think>" + "Hello! I am DeepSeek." + EOS
                           + U + "1+1=?" + A + "<think>")


def test_tools_keep_all_reasoning_and_render_calls_and_results() -> None:
    req = request(
        msg("system", "You are a helpful assistant."),
        msg("user", "Weather in Beijing?"),
        msg("assistant", "", reasoning_content="Use the tool.",
            calls=[("c1", "get_weather", '{"location": "Beijing"}')]),
        msg("tool", '{"temp": 20}', tool_call_id="c1"),
        msg("assistant", "It is 20 degrees.", reasoning_content="Got it."),
        msg("user", "Thanks!"),
        thinking=True, tools=True)
    block = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
             '<｜DSML｜parameter name="location" string="true">Beijing</｜DSML｜parameter>\n'
             '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
    assert prompt(req) == (
        BOS + "You are a helpful assistant.\n\n" + TOOLS_SECTION
        + U + "Weather in Beijing?" + A + "<think>" + "Use the tool.</think>" + block + EOS
        + U + '<tool_result>{"temp": 20}</tool_result>' + A + "<think>" + "Got it.</think>It is 20 degrees." + EOS
        + U + "Thanks!" + A + "<think>")


def test_tools_without_system_turn_get_an_empty_one_first() -> None:
    req = request(msg("user", "Weather?"), tools=True)
    assert prompt(req) == BOS + "\n\n" + TOOLS_SECTION + U + "Weather?" + A + "</think>"


def test_tool_results_follow_call_order_and_merge_with_user_text() -> None:
    calls = [("a", "get_weather", '{"location": "Oslo"}'), ("b", "get_weather", '{"location": "Rome"}')]
    req = request(msg("user", "Oslo and Rome?"), msg("assistant", "", calls=calls),
                  msg("tool", "rome: 25", tool_call_id="b"), msg("tool", "oslo: 3", tool_call_id="a"),
                  msg("user", "Which is warmer?"), tools=True)
    text = prompt(req)
    tail = (U + "<tool_result>oslo: 3</tool_result>\n\n<tool_result>rome: 25</tool_result>\n\nWhich is warmer?"
            + A + "</think>")
    assert text.endswith(tail)
    assert text.count(U) == 2  # the two results and the question are one user turn


def test_each_results_turn_follows_the_calls_just_before_it() -> None:
    def calls(*ids: str) -> list:
        return [(i, "get_weather", json.dumps({"location": i})) for i in ids]

    req = request(msg("user", "go"),
                  msg("assistant", "", calls=calls("x", "y")),
                  msg("tool", "Y1", tool_call_id="y"), msg("tool", "X1", tool_call_id="x"),
                  msg("assistant", "", calls=calls("y", "x")),
                  msg("tool", "X2", tool_call_id="x"), msg("tool", "Y2", tool_call_id="y"), tools=True)
    text = prompt(req)
    assert "<tool_result>X1</tool_result>\n\n<tool_result>Y1</tool_result>" + A in text
    assert text.endswith(U + "<tool_result>Y2</tool_result>\n\n<tool_result>X2</tool_result>" + A + "</think>")


def test_non_string_arguments_are_json_with_string_false() -> None:
    args = {"city": "Zürich", "days": 3, "units": ["c", "f"], "alerts": True, "extra": None}
    req = request(msg("user", "q"), msg("assistant", "Checking.", calls=[("x", "get_weather", json.dumps(args))]),
                  msg("tool", "ok", tool_call_id="x"))
    params = ['<｜DSML｜parameter name="city" string="true">Zürich</｜DSML｜parameter>',
              '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>',
              '<｜DSML｜parameter name="units" string="false">["c", "f"]</｜DSML｜parameter>',
              '<｜DSML｜parameter name="alerts" string="false">true</｜DSML｜parameter>',
              '<｜DSML｜parameter name="extra" string="false">null</｜DSML｜parameter>']
    expected_turn = ("Checking.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n" + "\n".join(params)
                     + "\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS)
    assert prompt(req) == BOS + U + "q" + A + "</think>" + expected_turn + U + "<tool_result>ok</tool_result>" + A \
        + "</think>"


def test_max_effort_prefix_comes_first_in_thinking_mode() -> None:
    req = request(msg("system", "S"), msg("user", "q"), thinking=True, effort=generate_pb2.REASONING_EFFORT_MAX)
    assert prompt(req) == BOS + MAX_EFFORT + "S" + U + "q" + A + "<think>"
    high = request(msg("system", "S"), msg("user", "q"), thinking=True, effort=generate_pb2.REASONING_EFFORT_HIGH)
    assert prompt(high) == BOS + "S" + U + "q" + A + "<think>"


def test_developer_is_the_system_role() -> None:
    assert prompt(request(msg("developer", "Rules."), msg("user", "q"))) == BOS + "Rules." + U + "q" + A + "</think>"


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (request(msg("user", "a"), msg("robot", "b")), "messages[1].role"),
        (request(msg("user", "a"), msg("assistant", "b")), "messages[1].role"),
        (request(msg("user", "a", calls=[("i", "f", "{}")])), "messages[0].tool_calls"),
        (request(msg("user", "a", reasoning_content="r")), "messages[0].reasoning_content"),
        (request(msg("user", "a", tool_call_id="i")), "messages[0].tool_call_id"),
        (request(msg("user", "a"), msg("assistant", "", calls=[("i", "f", "[1]")]), msg("user", "b")),
         "messages[1].tool_calls[0].arguments"),
        (request(msg("user", "a"), msg("assistant", "", calls=[("i", "f", "{oops")]), msg("user", "b")),
         "messages[1].tool_calls[0].arguments"),
        (request(msg("user", "a"), msg("assistant", "", calls=[("i", "f", "[" * 100_000)]), msg("user", "b")),
         "messages[1].tool_calls[0].arguments"),  # nested past the parser's recursion limit
        (request(msg("user", "a"), msg("assistant", "", calls=[("i", 'f"x', "{}")]), msg("user", "b")),
         "messages[1].tool_calls[0].name"),
        (request(msg("user", "a"), effort=generate_pb2.REASONING_EFFORT_MAX), "chat.reasoning_effort"),
        (generate_pb2.GenerateRequest(messages=[msg("user", "a")], chat=generate_pb2.ChatOptions(
            tools=[generate_pb2.Tool(name="bad name")])), "chat.tools[0].name"),
        (generate_pb2.GenerateRequest(messages=[msg("user", "a")], chat=generate_pb2.ChatOptions(
            tools=[generate_pb2.Tool(name="f", parameters_json='"str"')])), "chat.tools[0].parameters"),
    ],
)
def test_refusals_name_the_field(req: generate_pb2.GenerateRequest, field: str) -> None:
    with pytest.raises(RequestError) as err:
        render(*conversation_from_proto(req))
    assert err.value.field == field


def test_options_refuse_max_effort_without_thinking() -> None:
    from orchestrator.router.chat.conversation import ReasoningEffort

    with pytest.raises(RequestError, match="chat.reasoning_effort"):
        ChatOptions(thinking=False, effort=ReasoningEffort.MAX)
