"""From a client's GenerateRequest to a validated, tokenised GenerationRequest.

Every refusal is a `RequestError` naming the field (the server answers INVALID_ARGUMENT with it):
not exactly one of prompt, token_ids and messages, a conversation that breaks the chat encoding's
rules (`messages[i].role`, ...), an empty prompt, a prompt at or over the model's context,
token ids outside the vocabulary, bad sampling values, a request id that is too long.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from orchestrator.router.chat.encoding import prompt_of
from orchestrator.router.tenancy import tenant_salt
from tandem.blocks import block_hashes
from tandem.request import GenerationRequest, RequestError, sampling_from_proto
from tandem.tokenizer import Tokenizer
from tandem.v1 import generate_pb2

MAX_ID_CHARS = 128
MAX_PROMPT_CHARS = 8 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What the router accepts; the model's context bounds prompt + max_tokens."""

    max_context: int
    default_max_tokens: int
    max_tokens: int

    def __post_init__(self) -> None:
        if not 1 <= self.default_max_tokens <= self.max_tokens:
            raise ValueError(f"Limits: need 1 <= default_max_tokens ({self.default_max_tokens}) "
                             f"<= max_tokens ({self.max_tokens})")


def admit(msg: generate_pb2.GenerateRequest, tokenizer: Tokenizer, limits: Limits, *,
          tenant: str) -> GenerationRequest:
    """Validate and tokenise; raises RequestError naming the bad field. The blocks are hashed with
    the tenant's salt (`tenancy.tenant_salt`: the tenant part first, then the client's cache_salt)."""
    for field in ("request_id", "session_id", "cache_salt"):
        if len(getattr(msg, field)) > MAX_ID_CHARS:
            raise RequestError(field, f"at most {MAX_ID_CHARS} characters, got {len(getattr(msg, field))}")
    given = [name for name, value in (("prompt", msg.prompt), ("token_ids", msg.token_ids),
                                      ("messages", msg.messages)) if value]
    if len(given) != 1:
        which = " and ".join(given) + " are set" if given else "none is set"
        raise RequestError("prompt", f"give exactly one of prompt, token_ids and messages ({which})")
    if msg.HasField("chat") and not msg.messages:
        raise RequestError("chat", "chat options apply to a request in its messages form only")
    if msg.messages:
        text = prompt_of(msg)  # the model's chat encoding; RequestError names messages[i].field
        if len(text) > MAX_PROMPT_CHARS:
            raise RequestError("messages", f"rendered to {len(text)} characters; at most {MAX_PROMPT_CHARS}")
        ids = tuple(tokenizer.encode(text))
    elif msg.prompt:
        if len(msg.prompt) > MAX_PROMPT_CHARS:
            raise RequestError("prompt", f"at most {MAX_PROMPT_CHARS} characters, got {len(msg.prompt)}")
        ids = tuple(tokenizer.encode(msg.prompt))
    else:
        ids = tuple(msg.token_ids)
        vocab = tokenizer.vocab_size
        for i, t in enumerate(ids):
            if t >= vocab:
                raise RequestError(f"token_ids[{i}]", f"{t} is not below the vocabulary size {vocab}")
    if len(ids) >= limits.max_context:
        raise RequestError("prompt", f"{len(ids)} tokens; the model's context is {limits.max_context} tokens")
    request_id = msg.request_id or uuid.uuid4().hex
    room = limits.max_context - len(ids)
    sampling = sampling_from_proto(
        msg.sampling, default_max_tokens=min(limits.default_max_tokens, room),
        max_tokens_limit=min(limits.max_tokens, room), vocab_size=tokenizer.vocab_size, request_id=request_id,
    )
    salt = tenant_salt(tenant, msg.cache_salt)
    return GenerationRequest(
        request_id=request_id,
        prompt_ids=ids,
        sampling=sampling,
        block_hashes=tuple(block_hashes(ids, salt=salt)),
        session_id=msg.session_id or None,
        cache_salt=salt,
        trace_id=uuid.uuid4().hex,
    )
