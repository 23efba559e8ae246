"""Generate in its `messages` form, through the real Frontend over a scripted decode worker: the
prompt the worker gets is the official V4 encoding, and the chunks carry answer text, reasoning
and (last chunk) the parsed tool calls, whatever way the model's text was cut into steps."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import CollectorRegistry
from support.scripted import scripted_chat

from orchestrator.router.chat.stream import call_id
from orchestrator.router.frontend import ErrorCode, RouterError
from tandem.stream import Finish
from tandem.tokenizer import ByteTokenizer
from tandem.v1 import generate_pb2

pytestmark = pytest.mark.router

TOOL = generate_pb2.Tool(name="get_weather", parameters_json=json.dumps({"type": "object"}))
CALL_TEXT = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
             '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
             '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')


def run(pieces: list[str], msg: generate_pb2.GenerateRequest, *, finish: Finish = Finish.STOP,
        split: bool = False) -> tuple[list[generate_pb2.GenerateChunk], tuple[int, ...]]:
    """The chunks of msg when the model writes `pieces`, and the prompt ids the workers got."""
    gateway, frontend = scripted_chat(pieces, CollectorRegistry(), finish=finish, split=split)

    async def go() -> list[generate_pb2.GenerateChunk]:
        return [c async for c in frontend.generate(msg)]

    chunks = asyncio.run(go())
    return chunks, gateway.requests[0].prompt_ids


def chat(*turns: tuple[str, str], thinking: bool = False, tools: bool = False) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        request_id="req-1", messages=[generate_pb2.ChatMessage(role=r, content=c) for r, c in turns],
        chat=generate_pb2.ChatOptions(thinking=thinking, tools=[TOOL] if tools else []))


def test_worker_gets_the_encoded_conversation() -> None:
    _, prompt_ids = run(["Hi."], chat(("system", "Be kind."), ("user", "Hello"), thinking=True))
    expected = "Be kind.<｜User｜>Hello<｜Assistant｜><think>"
    assert prompt_ids == tuple(ByteTokenizer().encode(expected))  # BOS id, then the text


@pytest.mark.parametrize("split", [False, True])  # the first piece from a prefill worker, or all from the decode
def test_chunks_split_reasoning_answer_and_calls_across_steps(split: bool) -> None:
    output = "Need weather.</think>Checking Paris." + CALL_TEXT
    pieces = [output[i:i + 7] for i in range(0, len(output), 7)]  # steps cut markers anywhere
    chunks, _ = run(pieces, chat(("user", "Weather in Paris?"), thinking=True, tools=True), split=split)
    assert [c.token_ids for c in chunks] == [list(p.encode()) for p in pieces]  # every step still streams
    assert "".join(c.reasoning_text for c in chunks) == "Need weather."
    assert "".join(c.text for c in chunks) == "Checking Paris."
    assert all(not c.tool_calls for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == generate_pb2.FINISH_REASON_STOP
    assert [(c.id, c.name, json.loads(c.arguments_json)) for c in last.tool_calls] == [
        (call_id("req-1", 0), "get_weather", {"city": "Paris", "days": 2})]
    assert last.usage.completion_tokens == len(output.encode())


def test_chat_mode_without_tools_passes_text_through() -> None:
    chunks, _ = run(["plain ", "answer </think> kept"], chat(("user", "q")))
    assert "".join(c.text for c in chunks) == "plain answer </think> kept"
    assert not any(c.reasoning_text for c in chunks) and not chunks[-1].tool_calls


def test_a_length_cut_inside_a_call_block_is_returned_as_text() -> None:
    cut = CALL_TEXT[:60]
    chunks, _ = run(["Let me look.", cut], chat(("user", "q"), tools=True), finish=Finish.LENGTH)
    assert "".join(c.text for c in chunks) == "Let me look." + cut
    assert chunks[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH and not chunks[-1].tool_calls


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (generate_pb2.GenerateRequest(prompt="p", messages=[generate_pb2.ChatMessage(role="user", content="u")]),
         "prompt: give exactly one of prompt, token_ids and messages (prompt and messages are set)"),
        (generate_pb2.GenerateRequest(prompt="p", chat=generate_pb2.ChatOptions(thinking=True)),
         "chat: chat options apply to a request in its messages form only"),
        (chat(("user", "a"), ("wizard", "b")), "messages[1].role: 'wizard' is not one of"),
        (chat(("user", "a"), ("assistant", "b")), "messages[1].role: the conversation must end with a user or tool"),
    ],
)
def test_bad_conversations_are_invalid_argument(msg: generate_pb2.GenerateRequest, message: str) -> None:
    with pytest.raises(RouterError) as err:
        run(["x"], msg)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT and err.value.message.startswith(message)
