"""The serving engine: scheduler (continuous batching, chunked prefill), model runner, sampler.

`Engine` (engine.py) ties them together; the Ray actors in workers/prefill.py and
workers/decode.py drive one `Engine` per rank.
"""
