"""The chat-specific parts of a POST /v1/chat/completions body (pydantic; unknown fields refused).

- messages: OpenAI messages: system, developer (= system), user, assistant (content, `tool_calls`,
  DeepSeek's `reasoning_content`), tool (`tool_call_id`, content). Content is a string or a list of
  text parts (joined); other part types are refused.
- tools: OpenAI function tools; `strict: true` is refused (Tandem does not constrain decoding).
- tool_choice: "auto" (the default) or "none" (the tools are neither shown to the model nor parsed
  from its output). "required" and a named function are refused: they need constrained decoding.
- parallel_tool_calls: only true (the model may make several calls in one turn).
- thinking mode, off by default, switched on by any of: `thinking: {"type": "enabled"}` (DeepSeek's
  API), `chat_template_kwargs: {"thinking": true}` or `{"enable_thinking": true}` (as vLLM and
  SGLang accept), or a `reasoning_effort` ("high", or "max" which adds the encoding's max-effort
  instruction). Contradicting switches are a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCallBody(_Body):
    name: str
    arguments: str  # JSON object text, as OpenAI sends it


class ToolCallBody(_Body):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCallBody
    index: int | None = None  # present when a client echoes streamed calls back


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = None
    refusal: None = None  # echoed back by clients as null; Tandem never refuses in-band

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionBody(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema: arbitrary JSON by definition
    strict: Literal[False] | None = None


class ToolBody(_Body):
    type: Literal["function"]
    function: FunctionBody


class ThinkingBody(_Body):
    type: Literal["enabled", "disabled"]


class TemplateKwargs(_Body):
    thinking: bool | None = None
    enable_thinking: bool | None = None


class ChatFields(_Body):
    """Mixed into ChatRequest. Field order matters: later validators read earlier fields."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolBody] | None = None
    tool_choice: Literal["auto", "none"] | None = None
    parallel_tool_calls: Literal[True] | None = None
    thinking: ThinkingBody | None = None
    chat_template_kwargs: TemplateKwargs | None = None
    reasoning_effort: Literal["high", "max"] | None = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _supported_choice(cls, value: object) -> object:
        if value is None or value in ("auto", "none"):
            return value
        raise ValueError(f"{value!r} is not supported: only 'auto' and 'none' ('required' and a named "
                         f"function need constrained decoding, which Tandem does not do)")

    @field_validator("chat_template_kwargs")
    @classmethod
    def _one_thinking_switch(cls, value: TemplateKwargs | None,
                             info: ValidationInfo) -> TemplateKwargs | None:
        if value is not None:
            said = {v for v in (value.thinking, value.enable_thinking, _said(info.data.get("thinking")))
                    if v is not None}
            if len(said) > 1:
                raise ValueError("thinking is switched both on and off (thinking, "
                                 "chat_template_kwargs.thinking, chat_template_kwargs.enable_thinking)")
        return value

    @field_validator("reasoning_effort")
    @classmethod
    def _effort_needs_thinking(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and _explicit_thinking(info.data.get("thinking"),
                                                    info.data.get("chat_template_kwargs")) is False:
            raise ValueError(f"{value!r} needs thinking mode, which this request switches off")
        return value

    @property
    def thinking_on(self) -> bool:
        """The switch as given, else on exactly when a reasoning effort is asked for."""
        explicit = _explicit_thinking(self.thinking, self.chat_template_kwargs)
        return explicit if explicit is not None else self.reasoning_effort is not None

    @property
    def offered_tools(self) -> list[ToolBody]:
        """The tools shown to the model: none with tool_choice "none"."""
        return [] if self.tool_choice == "none" else list(self.tools or [])


def _said(thinking: ThinkingBody | None) -> bool | None:
    return None if thinking is None else thinking.type == "enabled"


def _explicit_thinking(thinking: ThinkingBody | None, kwargs: TemplateKwargs | None) -> bool | None:
    for v in (_said(thinking), kwargs and kwargs.thinking, kwargs and kwargs.enable_thinking):
        if v is not None:
            return v
    return None
