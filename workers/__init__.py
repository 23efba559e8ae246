"""Tandem's workers: the DeepSeek-V4 model, KV pools, transfer, engines and the Ray actors."""
