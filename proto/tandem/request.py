"""A generation request after validation: what the router hands to workers.

`SamplingConfig` and `GenerationRequest` are frozen and validated on construction; their errors
name the field (`RequestError.field`) so the router can answer INVALID_ARGUMENT with it.
`from_proto` turns a `tandem.v1.GenerateRequest` into these, given the already tokenised prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tandem.v1 import generate_pb2

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20


class RequestError(ValueError):
    """A request field with a bad value; str() says which field and why."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are picked; temperature 0 is greedy. See generate.proto for each field."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # return each chosen token's logprob
    top_logprobs: int = 0  # and the n most likely alternatives (needs logprobs)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise RequestError("sampling.temperature", f"must be in [0, 100], got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise RequestError("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError("sampling.top_k", f"must be >= 0, got {self.top_k}")
        if not 0 <= self.seed < 2**64:
            raise RequestError("sampling.seed", f"must be in [0, 2**64), got {self.seed}")
        if self.max_tokens < 1:
            raise RequestError("sampling.max_tokens", f"must be >= 1, got {self.max_tokens}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise RequestError("sampling.stop", f"at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for i, s in enumerate(self.stop):
            if not 0 < len(s) <= MAX_STOP_STRING_CHARS:
                why = f"length must be in [1, {MAX_STOP_STRING_CHARS}], got {len(s)}"
                raise RequestError(f"sampling.stop[{i}]", why)
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            n = len(self.stop_token_ids)
            raise RequestError("sampling.stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS}, got {n}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            n = self.top_logprobs
            raise RequestError("sampling.top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {n}")
        if self.top_logprobs and not self.logprobs:
            raise RequestError("sampling.top_logprobs", "needs sampling.logprobs to be set")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    """A tokenised, validated request. block_hashes cover the prompt's full blocks, salted."""

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingConfig
    block_hashes: tuple[int, ...] = ()
    session_id: str | None = None
    cache_salt: str | None = None
    trace_id: str = ""

    def __post_init__(self) -> None:
        if not self.request_id:
            raise RequestError("request_id", "must be non-empty")
        if not self.prompt_ids:
            raise RequestError("prompt", "the prompt is empty")


def sampling_from_proto(msg: generate_pb2.SamplingParams, *, default_max_tokens: int, max_tokens_limit: int,
                        vocab_size: int, request_id: str) -> SamplingConfig:
    """Validate proto sampling parameters and fill defaults; seed defaults to one derived from the id."""
    max_tokens = msg.max_tokens if msg.HasField("max_tokens") else default_max_tokens
    if max_tokens > max_tokens_limit:
        raise RequestError("sampling.max_tokens", f"must be <= {max_tokens_limit}, got {max_tokens}")
    for i, t in enumerate(msg.stop_token_ids):
        if t >= vocab_size:
            raise RequestError(f"sampling.stop_token_ids[{i}]", f"{t} is not below vocab size {vocab_size}")
    seed = msg.seed if msg.HasField("seed") else _seed_of(request_id)
    return SamplingConfig(
        temperature=msg.temperature,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        top_k=msg.top_k,
        seed=seed,
        max_tokens=max_tokens,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs,
        top_logprobs=msg.top_logprobs,
    )


def _seed_of(request_id: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")
