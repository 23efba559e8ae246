"""Rendering chat messages into one prompt string.

The DeepSeek conversation markers: a system prompt first, then each user turn after `<｜User｜>` and
each assistant turn after `<｜Assistant｜>`, ending with `<｜Assistant｜>` so the model answers. With
thinking off the assistant's turn opens with an empty reasoning block `</think>`. (The full V4
encoding, tool calls and thinking mode arrive with the chat issue.)
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.api.schemas import ChatMessage

USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
END_OF_TURN = "<｜end▁of▁sentence｜>"
THINK_END = "</think>"


def render(messages: Sequence[ChatMessage]) -> str:
    """The prompt text for messages, ready for the model to write the next assistant turn."""
    system = "\n\n".join(m.content for m in messages if m.role in ("system", "developer"))
    parts = [system]
    for m in messages:
        if m.role == "user":
            parts.append(USER + m.content)
        elif m.role == "assistant":
            parts.append(ASSISTANT + THINK_END + m.content + END_OF_TURN)
    parts.append(ASSISTANT + THINK_END)
    return "".join(parts)
