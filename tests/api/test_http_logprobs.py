"""Logprobs over HTTP, read by the official `openai` client: /v1/completions (legacy `logprobs: n`)
and /v1/chat/completions (`logprobs` + `top_logprobs`), streamed and not.

The workers are a scripted in-memory gateway whose tokens spell "aé" with the byte tokenizer, the
"é" split over two byte tokens (neither valid UTF-8 alone), then EOS; alternatives include an id the
tokenizer does not map. Expected values are written out from that script (dyadic logprobs, exact in
the wire's float32).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry
from support.scripted_gateway import ScriptedGateway, Step, idle_worker, scripted_frontend

from orchestrator.api.app import create_app
from orchestrator.api.auth import Auth
from orchestrator.router.inputs import Role
from tandem.stream import TokenLogprob

pytestmark = pytest.mark.router

SCRIPT = (
    Step((97,), "a", (TokenLogprob(97, -0.5, ((97, -0.5), (98, -1.5))),)),
    Step((0xC3,), "", (TokenLogprob(0xC3, -0.125, ((0xC3, -0.125), (300, -2.5))),)),
    Step((0xA9,), "é", (TokenLogprob(0xA9, -0.0078125, ((0xA9, -0.0078125), (257, -4.0))),)),
    Step((257,), "", (TokenLogprob(257, -3.0, ((33, -0.25), (97, -1.75))),)),  # chosen not in the top 2
)
TOKENS = ["a", "bytes:\\xc3", "bytes:\\xa9", "<eos>"]
TOKEN_LOGPROBS = [-0.5, -0.125, -0.0078125, -3.0]
TOP_DICTS = [{"a": -0.5, "b": -1.5}, {"bytes:\\xc3": -0.125, "<id:300>": -2.5},
             {"bytes:\\xa9": -0.0078125, "<eos>": -4.0}, {"!": -0.25, "a": -1.75, "<eos>": -3.0}]
TEXT_OFFSET = [0, 1, 1, 2]  # both bytes of "é" start at its character
BYTES = [[97], [0xC3], [0xA9], None]
TOP_CHAT = [[("a", -0.5, [97]), ("b", -1.5, [98])], [("bytes:\\xc3", -0.125, [0xC3]), ("<id:300>", -2.5, None)],
            [("bytes:\\xa9", -0.0078125, [0xA9]), ("<eos>", -4.0, None)], [("!", -0.25, [33]), ("a", -1.75, [97])]]


def _with_client(split: bool, go: Callable[[openai.AsyncOpenAI], Awaitable[object]]) -> tuple[object, ScriptedGateway]:
    registry = CollectorRegistry()
    gateway = ScriptedGateway(SCRIPT, [idle_worker("prefill-0", Role.PREFILL), idle_worker("decode-0", Role.DECODE)])
    app = create_app(scripted_frontend(gateway, registry, split=split), model_name="tiny", auth=Auth(None, None),
                     registry=registry)

    async def run() -> object:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="none", http_client=http, max_retries=0)
            return await go(client)

    return asyncio.run(run()), gateway


@pytest.mark.parametrize("split", [False, True])
def test_completions_legacy_logprobs_streamed_and_not(split: bool) -> None:
    async def go(client: openai.AsyncOpenAI) -> tuple:
        done = await client.completions.create(model="tiny", prompt="hi", max_tokens=4, logprobs=2)
        stream = await client.completions.create(model="tiny", prompt="hi", max_tokens=4, logprobs=2, stream=True)
        return done, [c async for c in stream]

    (done, chunks), gw = _with_client(split, go)
    assert [(r.sampling.logprobs, r.sampling.top_logprobs) for r in gw.requests] == [(True, 2), (True, 2)]
    lp = done.choices[0].logprobs
    assert done.choices[0].text == "aé"
    assert (lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset) == (
        TOKENS, TOKEN_LOGPROBS, TOP_DICTS, TEXT_OFFSET)
    assert [list(d) for d in lp.top_logprobs] == [list(d) for d in TOP_DICTS]  # most likely first
    # Streamed: each chunk holds its own tokens; together they are the non-streamed object, the
    # offsets running on across chunks.
    parts = [c.choices[0].logprobs for c in chunks]
    assert [len(p.tokens) for p in parts] == [1, 1, 1, 1]
    assert [t for p in parts for t in p.tokens] == TOKENS
    assert [t for p in parts for t in p.token_logprobs] == TOKEN_LOGPROBS
    assert [t for p in parts for t in p.top_logprobs] == TOP_DICTS
    assert [t for p in parts for t in p.text_offset] == TEXT_OFFSET
    assert "".join(c.choices[0].text for c in chunks) == "aé"


@pytest.mark.parametrize("split", [False, True])
def test_chat_logprobs_streamed_and_not(split: bool) -> None:
    msgs = [{"role": "user", "content": "hi"}]

    async def go(client: openai.AsyncOpenAI) -> tuple:
        done = await client.chat.completions.create(model="tiny", messages=msgs, logprobs=True, top_logprobs=2)
        stream = await client.chat.completions.create(model="tiny", messages=msgs, logprobs=True, top_logprobs=2,
                                                      stream=True)
        return done, [c async for c in stream]

    (done, chunks), gw = _with_client(split, go)
    assert [(r.sampling.logprobs, r.sampling.top_logprobs) for r in gw.requests] == [(True, 2), (True, 2)]
    content = done.choices[0].logprobs.content
    streamed = [e for c in chunks for e in c.choices[0].logprobs.content]
    assert [len(c.choices[0].logprobs.content) for c in chunks] == [1, 1, 1, 1]
    for entries in (content, streamed):
        assert [(e.token, e.logprob, e.bytes) for e in entries] == list(zip(TOKENS, TOKEN_LOGPROBS, BYTES,
                                                                            strict=True))
        assert [[(t.token, t.logprob, t.bytes) for t in e.top_logprobs] for e in entries] == TOP_CHAT
    # The raw bytes put the split character back together, as the `bytes` field promises.
    assert bytes(b for e in content if e.bytes for b in e.bytes).decode() == "aé" == done.choices[0].message.content


def test_no_logprobs_unless_asked_and_bad_values_are_refused() -> None:
    async def go(client: openai.AsyncOpenAI) -> tuple:
        plain = await client.completions.create(model="tiny", prompt="hi", max_tokens=4)
        chat = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        only = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                    logprobs=True)
        errors = []
        for call in (lambda: client.completions.create(model="tiny", prompt="hi", logprobs=21),
                     lambda: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                            top_logprobs=2)):
            with pytest.raises(openai.BadRequestError) as err:
                await call()
            errors.append(err.value.body["param"])
        return plain, chat, only, errors

    (plain, chat, only, errors), gw = _with_client(False, go)
    assert plain.choices[0].logprobs is None and chat.choices[0].logprobs is None
    assert [(r.sampling.logprobs, r.sampling.top_logprobs) for r in gw.requests] == [(False, 0), (False, 0),
                                                                                      (True, 0)]
    # logprobs without top_logprobs: the chosen tokens only, no alternatives.
    assert [(e.token, e.top_logprobs) for e in only.choices[0].logprobs.content] == [(t, []) for t in TOKENS]
    assert errors == ["logprobs", "sampling.top_logprobs"]
