"""Request bodies of the OpenAI-compatible endpoints (pydantic, unknown fields refused by name).

Only what Tandem honours is accepted: a field it would have to ignore (n > 1, penalties, ...) is
a 400 naming the field, never silently dropped.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.api.chat_schemas import ChatFields
from tandem.request import MAX_TOP_LOGPROBS


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingBody(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0
    user: str | None = Field(default=None, max_length=128)
    ignore_eos: bool = False

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprob_request(self) -> tuple[bool, int]:
        """(return the chosen tokens' logprobs, how many alternatives); each endpoint says how."""
        return False, 0


class CompletionRequest(SamplingBody):
    """POST /v1/completions."""

    prompt: str | list[int]
    echo: Literal[False] = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # legacy: n alternatives

    @model_validator(mode="after")
    def _non_empty(self) -> CompletionRequest:
        if not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    @property
    def logprob_request(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0


class ChatRequest(SamplingBody, ChatFields):
    """POST /v1/chat/completions; the conversation, tools and thinking fields are in ChatFields."""
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # needs logprobs

    @property
    def logprob_request(self) -> tuple[bool, int]:
        return bool(self.logprobs), self.top_logprobs or 0
