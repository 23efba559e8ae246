"""A small client for the router's Generate stream (used by `tandem generate` and the tests).

Bearer tokens travel as `authorization: Bearer <token>` metadata; TLS uses the given CA bundle
(and a client certificate for mutual TLS). `chunk_to_json` is the one JSON shape the CLI prints:
proto field names at the top level, integers as numbers, `logprobs` only when the request asked for
them, `reasoning_text` only when the chunk has some, `tool_calls` (last chunk of a chat with tools)
only when the model made calls, the summary fields only on the last chunk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from orchestrator.router.chat.conversation import ReasoningEffort
from tandem.v1 import generate_pb2, generate_pb2_grpc


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS connection: the CA that signed the server, and optionally our identity."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None


def open_channel(address: str, tls: TlsFiles | None = None) -> grpc.Channel:
    """A blocking channel to the router at host:port."""
    if tls is None:
        return grpc.insecure_channel(address)
    with open(tls.ca_file, "rb") as f:
        ca = f.read()
    cert = key = None
    if tls.cert_file and tls.key_file:
        with open(tls.cert_file, "rb") as f:
            cert = f.read()
        with open(tls.key_file, "rb") as f:
            key = f.read()
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert))


_EFFORT = {ReasoningEffort.HIGH: generate_pb2.REASONING_EFFORT_HIGH,
           ReasoningEffort.MAX: generate_pb2.REASONING_EFFORT_MAX}


def make_request(
    *,
    prompt: str | None = None,
    token_ids: Sequence[int] | None = None,
    messages: Sequence[generate_pb2.ChatMessage] | None = None,
    thinking: bool = False,
    tools: Sequence[generate_pb2.Tool] = (),
    reasoning_effort: ReasoningEffort | None = None,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    ignore_eos: bool = False,
    stop: Sequence[str] = (),
    session_id: str = "",
    request_id: str = "",
    deadline_ms: int = 0,
    cache_salt: str = "",
    logprobs: int | None = None,
) -> generate_pb2.GenerateRequest:
    """A GenerateRequest from keyword arguments; exactly one of prompt, token_ids and messages.
    `logprobs` n asks for each chosen token's logprob and the n most likely alternatives (0: none).

    `messages` is a conversation the router renders with the model's chat encoding; `thinking`,
    `tools` and `reasoning_effort` (which needs `thinking`) go with it and only with it. The
    conversation itself is validated by the router (INVALID_ARGUMENT naming the field)."""
    given = [name for name, value in (("prompt", prompt), ("token_ids", token_ids), ("messages", messages))
             if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, token_ids and messages, got {given or 'none'}")
    chat_only = [name for name, on in (("thinking", thinking), ("tools", bool(tools)),
                                       ("reasoning_effort", reasoning_effort is not None)) if on]
    if messages is None and chat_only:
        raise ValueError(f"{', '.join(chat_only)}: only with messages (a chat), not with {given[0]}")
    if reasoning_effort is not None and not thinking:
        raise ValueError(f"reasoning_effort={reasoning_effort.value}: needs thinking=True")
    sampling = generate_pb2.SamplingParams(temperature=temperature, ignore_eos=ignore_eos, stop=list(stop))
    if logprobs is not None:
        sampling.logprobs, sampling.top_logprobs = True, logprobs
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if seed is not None:
        sampling.seed = seed
    request = generate_pb2.GenerateRequest(
        request_id=request_id, prompt=prompt or "", token_ids=list(token_ids or ()), sampling=sampling,
        session_id=session_id, deadline_ms=deadline_ms, cache_salt=cache_salt,
    )
    if messages is not None:
        request.messages.extend(messages)
        request.chat.CopyFrom(generate_pb2.ChatOptions(
            thinking=thinking, tools=list(tools),
            reasoning_effort=generate_pb2.REASONING_EFFORT_UNSPECIFIED if reasoning_effort is None
            else _EFFORT[reasoning_effort]))
    return request


def generate(
    channel: grpc.Channel,
    request: generate_pb2.GenerateRequest,
    *,
    token: str | None = None,
    timeout_s: float | None = None,
) -> Iterator[generate_pb2.GenerateChunk]:
    """Stream the chunks of one generation; raises grpc.RpcError with the router's status."""
    stub = generate_pb2_grpc.RouterStub(channel)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    yield from stub.Generate(request, metadata=metadata, timeout=timeout_s)


def logprob_to_json(lp: generate_pb2.TokenLogprob) -> dict:
    """{"token_id", "logprob", "top": [[id, logprob], ...]} (top most likely first)."""
    return {"token_id": lp.token_id, "logprob": lp.logprob, "top": [[t.token_id, t.logprob] for t in lp.top]}


def logprob_line(lp: generate_pb2.TokenLogprob) -> str:
    """One token's logprobs as a text line: `id logprob | id:logprob ...` (the alternatives)."""
    top = " ".join(f"{t.token_id}:{t.logprob:.4f}" for t in lp.top)
    return f"{lp.token_id}\t{lp.logprob:.4f}" + (f"\t| {top}" if top else "")


def tool_call_to_json(call: generate_pb2.ToolCall) -> dict:
    """{"id", "name", "arguments": the arguments object} (the router only returns JSON objects)."""
    return {"id": call.id, "name": call.name, "arguments": json.loads(call.arguments_json)}


def tool_call_line(call: generate_pb2.ToolCall) -> str:
    """One tool call as a text line: `tool call NAME ARGUMENTS-JSON (ID)`."""
    return f"tool call {call.name} {call.arguments_json} ({call.id})"


def chunk_to_json(chunk: generate_pb2.GenerateChunk) -> dict:
    """The CLI's JSON object for a chunk (one per line with --json)."""
    out: dict = {"token_ids": list(chunk.token_ids), "text": chunk.text}
    if chunk.reasoning_text:
        out["reasoning_text"] = chunk.reasoning_text
    if chunk.tool_calls:
        out["tool_calls"] = [tool_call_to_json(c) for c in chunk.tool_calls]
    if chunk.logprobs:
        out["logprobs"] = [logprob_to_json(lp) for lp in chunk.logprobs]
    if chunk.finish_reason == generate_pb2.FINISH_REASON_UNSPECIFIED:
        return out
    t, u = chunk.timing, chunk.usage
    out.update(
        finish_reason=generate_pb2.FinishReason.Name(chunk.finish_reason).removeprefix("FINISH_REASON_").lower(),
        request_id=chunk.request_id,
        trace_id=chunk.trace_id,
        prefill_worker=chunk.prefill_worker,
        decode_worker=chunk.decode_worker,
        kv_transfer_bytes=chunk.kv_transfer_bytes,
        usage={"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
               "cached_tokens": u.cached_tokens},
        timing={"ttft_s": t.ttft_s, "queue_s": t.queue_s, "prefill_s": t.prefill_s,
                "transfer_s": t.transfer_s, "tpot_s": t.tpot_s, "total_s": t.total_s},
    )
    return out
