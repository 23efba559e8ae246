"""The KV-aware router: KV index, routing policies, load book (torch-free; see docs/router.md)."""
