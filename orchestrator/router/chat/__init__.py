"""DeepSeek-V4 chat: conversations rendered into prompts, and model output split into reasoning,
answer and tool calls. Pure Python; the router and the HTTP API both import it."""
