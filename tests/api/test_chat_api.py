"""/v1/chat/completions with tools and thinking, driven by the official `openai` client against the
real HTTP app and Frontend over a scripted decode worker (its "model" writes fixed V4 output).

Checks both directions: the prompt the worker receives is the official V4 encoding of what the
client sent (tools section, earlier calls and tool results included), and the model's DSML output
comes back as OpenAI tool_calls, streamed and not, with reasoning_content kept apart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry
from support.scripted import scripted_chat
from support.scripted_gateway import ScriptedGateway

from orchestrator.api.app import create_app
from orchestrator.api.auth import Auth

pytestmark = pytest.mark.router

EOS, U, A = "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
BLOCK = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
         '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
         '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
         '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
OUTPUT = "The user wants the weather.</think>" + BLOCK  # thinking mode: reasoning, then only a call


def pieces(text: str, size: int = 5) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def call(pieces: list[str], fn):  # noqa: ANN001, ANN201
    """fn(client) against a fresh app whose model writes `pieces`; returns (its result, the gateway)."""
    registry = CollectorRegistry()
    gw, frontend = scripted_chat(pieces, registry)
    app = create_app(frontend, model_name="dsv4", auth=Auth(None, None), registry=registry)

    async def go():  # noqa: ANN202
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="unused", http_client=http, max_retries=0)
            return await fn(client)

    return asyncio.run(go()), gw


def prompt_text(gw: ScriptedGateway) -> str:
    ids = gw.requests[-1].prompt_ids
    assert ids[0] == 256  # the byte tokenizer's BOS: the encoding's <｜begin▁of▁sentence｜>
    return bytes(ids[1:]).decode()


def create(**kw: object):  # noqa: ANN201
    async def fn(client: openai.AsyncOpenAI):  # noqa: ANN202
        return await client.chat.completions.create(model="dsv4", **kw)
    return fn


def test_tool_call_round_trip_without_streaming() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    resp, gw = call(pieces(OUTPUT), create(messages=messages, tools=[WEATHER], extra_body={"chat_template_kwargs": {"thinking": True}}))
    prompt = prompt_text(gw)
    assert prompt.startswith("Be brief.\n\n## Tools\n\n")
    assert json.dumps(WEATHER["function"]) + "\n\nYou MUST strictly follow" in prompt
    assert prompt.endswith(U + "Weather in Paris?" + A + "<think>")
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    msg = choice.message
    assert msg.content is None and msg.model_extra["reasoning_content"] == "The user wants the weather."
    (tc,) = msg.tool_calls
    assert tc.type == "function" and tc.id.startswith("call_") and tc.function.name == "get_weather"
    assert json.loads(tc.function.arguments) == {"city": "Paris", "days": 2}

    # The next turn sends the call and its result back: the prompt renders them by the V4 rules.
    history = [*messages, msg, {"role": "tool", "tool_call_id": tc.id, "content": '{"sky": "sunny"}'}]
    resp2, gw2 = call(["It is sunny.</think>", "Sunny, 24 °C."], create(messages=history, tools=[WEATHER], extra_body={"thinking": {"type": "enabled"}}))
    assert prompt_text(gw2).endswith(
        U + "Weather in Paris?" + A + "<think>" + "The user wants the weather.</think>" + BLOCK + EOS
        + U + '<tool_result>{"sky": "sunny"}</tool_result>' + A + "<think>")
    assert resp2.choices[0].message.content == "Sunny, 24 °C." and resp2.choices[0].finish_reason == "stop"
    assert resp2.choices[0].message.model_extra["reasoning_content"] == "It is sunny."


def test_streamed_deltas_carry_reasoning_content_and_tool_calls() -> None:

    async def fn(client: openai.AsyncOpenAI) -> list:
        stream = await client.chat.completions.create(
            model="dsv4", stream=True, tools=[WEATHER], messages=[{"role": "user", "content": "Paris?"}])
        return [c async for c in stream]

    chunks, _ = call(pieces("Answering first." + BLOCK, 3), fn)
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == "Answering first."
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        (0, "get_weather", {"city": "Paris", "days": 2})]
    assert calls[0].id.startswith("call_") and calls[0].type == "function"
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"
    assert all(not (d.model_extra or {}).get("reasoning_content") for d in deltas)  # thinking is off


def test_streamed_reasoning_with_max_effort() -> None:

    async def fn(client: openai.AsyncOpenAI) -> list:
        stream = await client.chat.completions.create(
            model="dsv4", stream=True, reasoning_effort="max",  # type: ignore[arg-type]  # DeepSeek's level
            messages=[{"role": "user", "content": "Answer?"}])
        return [c.choices[0].delta async for c in stream]

    deltas, gw = call(pieces("Deep thought.</think>42", 4), fn)
    assert prompt_text(gw).startswith("Reasoning Effort: Absolute maximum with no shortcuts permitted.\n")
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "Deep thought."
    assert "".join(d.content or "" for d in deltas) == "42"


def test_tool_choice_none_hides_the_tools_and_parses_nothing() -> None:
    resp, gw = call([BLOCK.strip()], create(messages=[{"role": "user", "content": "q"}], tools=[WEATHER], tool_choice="none"))
    assert "## Tools" not in prompt_text(gw)
    assert resp.choices[0].message.content == BLOCK.strip() and not resp.choices[0].message.tool_calls
    assert "reasoning_content" not in (resp.choices[0].message.model_extra or {})


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required", "tools": [WEATHER]}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "tools": [WEATHER]},
         "tool_choice"),
        ({"tools": [{**WEATHER, "function": {**WEATHER["function"], "strict": True}}]}, "tools.0.function.strict"),
        ({"thinking": {"type": "enabled"}, "chat_template_kwargs": {"thinking": False}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"thinking": False}, "reasoning_effort": "max"}, "reasoning_effort"),
        ({"reasoning_effort": "medium"}, "reasoning_effort"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages[1].role"),
        ({"messages": [{"role": "user", "content": "q"},
                       {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                                             "function": {"name": "f", "arguments": "[1]"}}]},
                       {"role": "tool", "tool_call_id": "1", "content": "r"}]}, "messages[1].tool_calls[0].arguments"),
    ],
)
def test_unsupported_or_contradictory_requests_are_400_naming_the_field(extra: dict, param: str) -> None:
    body = {"model": "dsv4", "messages": [{"role": "user", "content": "q"}], **extra}

    async def fn(client: openai.AsyncOpenAI) -> httpx.Response:
        return await client._client.post("http://t/v1/chat/completions", json=body)

    r, _ = call(["x"], fn)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def _texts(parts: Sequence[str]) -> list[dict]:
    return [{"type": "text", "text": p} for p in parts]


def test_text_parts_and_developer_role_render_like_strings() -> None:
    _, gw = call(["ok"], create(messages=[{"role": "developer", "content": "Rules."},
                              {"role": "user", "content": _texts(["a", "b"])}]))
    assert prompt_text(gw) == "Rules." + U + "ab" + A + "</think>"
