"""Tandem's HTTP API (FastAPI), served beside the gRPC router: OpenAI-compatible completions and
chat, admin (status, scale, drain, down), Prometheus metrics, health."""
