"""OpenAI-compatible /v1/models, /v1/completions and /v1/chat/completions over the router.

Each body becomes a `tandem.v1.GenerateRequest` for the same `Frontend` the gRPC server uses, so
both doors route, admit and refuse alike. Streaming answers are server-sent events ending with
`data: [DONE]`; errors are OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`) with
the status the router's code maps to.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse

from orchestrator.api.auth import Auth
from orchestrator.api.chat import assistant_message, chat_delta, fill_chat
from orchestrator.api.logprobs import LogprobsWriter
from orchestrator.api.schemas import ChatRequest, CompletionRequest, SamplingBody
from orchestrator.router.frontend import ErrorCode, Frontend, RouterError
from orchestrator.router.tenancy import Caller
from tandem.v1 import generate_pb2

HTTP_STATUS = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.INTERNAL: 500,
}
_FINISH = {generate_pb2.FINISH_REASON_STOP: "stop", generate_pb2.FINISH_REASON_LENGTH: "length",
           generate_pb2.FINISH_REASON_CANCELLED: "stop"}


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def router_error_response(exc: RouterError) -> JSONResponse:
    param = exc.message.split(":", 1)[0] if exc.code is ErrorCode.INVALID_ARGUMENT else None
    return error_response(HTTP_STATUS[exc.code], exc.message, exc.code.value.lower(), param)


def _to_proto(
    body: SamplingBody, *, prompt: str | None, token_ids: list[int] | None
) -> generate_pb2.GenerateRequest:
    sampling = generate_pb2.SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                           stop=body.stop_list, ignore_eos=body.ignore_eos)
    sampling.logprobs, sampling.top_logprobs = body.logprob_request
    if body.limit is not None:
        sampling.max_tokens = body.limit
    if body.seed is not None:
        sampling.seed = body.seed
    return generate_pb2.GenerateRequest(request_id=uuid.uuid4().hex, prompt=prompt or "",
                                        token_ids=token_ids or [], sampling=sampling)


def _usage(chunk: generate_pb2.GenerateChunk) -> dict:
    u = chunk.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def make_openai_router(frontend: Frontend, model_name: str, auth: Auth) -> APIRouter:
    api = APIRouter(dependencies=[Depends(auth.client)])

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "tandem"}]}

    async def run(body: SamplingBody, msg: generate_pb2.GenerateRequest, chat: bool,  # noqa: ANN202
                  caller: Caller):
        if body.model != model_name:
            return error_response(404, f"model {body.model!r} is not served here (serving {model_name!r})",
                                  "invalid_request_error", "model")
        rid = ("chatcmpl-" if chat else "cmpl-") + msg.request_id
        created = int(time.time())
        writer = LogprobsWriter(frontend.tokenizer, chat=chat) if body.logprob_request[0] else None
        stream = frontend.generate(msg, caller)
        try:
            first = await anext(stream)  # errors before the first token become a plain HTTP error
        except RouterError as exc:
            return router_error_response(exc)
        except StopAsyncIteration:
            return error_response(500, "the router ended the stream without a chunk", "internal")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _sse(first, stream, rid, created, model_name, chat, include_usage, writer)
            return StreamingResponse(events, media_type="text/event-stream")
        text, reasoning, last, logprobs = first.text, first.reasoning_text, first, [first.logprobs]
        try:
            async for chunk in stream:
                text += chunk.text
                reasoning += chunk.reasoning_text
                last = chunk
                logprobs.append(chunk.logprobs)
        except RouterError as exc:
            return router_error_response(exc)
        finish = "tool_calls" if last.tool_calls else _FINISH.get(last.finish_reason, "stop")
        lp = writer.merged(logprobs) if writer else None
        message = assistant_message(text, reasoning, last.tool_calls, msg.chat.thinking) if chat else None
        choice = ({"index": 0, "message": message, "logprobs": lp,
                   "finish_reason": finish}
                  if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": lp})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": [choice], "usage": _usage(last)}

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, caller: Caller = Depends(auth.client)):  # noqa: ANN202
        text = body.prompt if isinstance(body.prompt, str) else None
        ids = body.prompt if isinstance(body.prompt, list) else None
        return await run(body, _to_proto(body, prompt=text, token_ids=ids), chat=False, caller=caller)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, caller: Caller = Depends(auth.client)):  # noqa: ANN202
        msg = _to_proto(body, prompt=None, token_ids=None)
        fill_chat(msg, body)
        return await run(body, msg, chat=True, caller=caller)

    return api


async def _sse(first: generate_pb2.GenerateChunk, rest: AsyncIterator[generate_pb2.GenerateChunk], rid: str,
               created: int, model: str, chat: bool, include_usage: bool,
               writer: LogprobsWriter | None) -> AsyncIterator[bytes]:
    def event(chunk: generate_pb2.GenerateChunk, role: bool) -> bytes:
        finish = None if not chunk.finish_reason else ("tool_calls" if chunk.tool_calls
                                                       else _FINISH.get(chunk.finish_reason))
        lp = writer.chunk(chunk.logprobs) if writer else None
        if chat:
            delta = chat_delta(chunk, role)
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": chunk.text, "finish_reason": finish, "logprobs": lp}
        body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": model, "choices": [choice]}
        if include_usage:
            body["usage"] = _usage(chunk) if finish else None
        return f"data: {json.dumps(body)}\n\n".encode()

    yield event(first, True)
    try:
        async for chunk in rest:
            yield event(chunk, False)
    except RouterError as exc:
        err = {"error": {"message": exc.message, "type": exc.code.value.lower(), "param": None, "code": None}}
        yield f"data: {json.dumps(err)}\n\n".encode()
    yield b"data: [DONE]\n\n"
