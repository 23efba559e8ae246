"""Workers' `TokenLogprob`s as the wire's `tandem.v1.TokenLogprob`s (one per token of a chunk).

The values are float64 in the workers and float32 on the wire (the proto's `float`); readers of a
chunk (the HTTP API, the CLI) take them from there.
"""

from __future__ import annotations

from collections.abc import Sequence

from tandem.stream import TokenLogprob
from tandem.v1 import generate_pb2


def logprobs_to_proto(logprobs: Sequence[TokenLogprob]) -> list[generate_pb2.TokenLogprob]:
    """One proto message per entry, `top` in the same order (most likely first)."""
    return [generate_pb2.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob,
        top=[generate_pb2.TopLogprob(token_id=i, logprob=v) for i, v in lp.top]) for lp in logprobs]
