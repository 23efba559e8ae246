"""tandem.request: validated sampling and requests; each refusal names its field."""

from __future__ import annotations

import pytest

from tandem.request import GenerationRequest, RequestError, SamplingConfig, sampling_from_proto
from tandem.v1 import generate_pb2

pytestmark = pytest.mark.foundation


def _from(msg: generate_pb2.SamplingParams, request_id: str = "r1") -> SamplingConfig:
    return sampling_from_proto(msg, default_max_tokens=32, max_tokens_limit=1000, vocab_size=300,
                               request_id=request_id)


def test_defaults_are_filled() -> None:
    s = _from(generate_pb2.SamplingParams())
    assert (s.temperature, s.top_p, s.top_k, s.max_tokens, s.greedy) == (0.0, 1.0, 0, 32, True)
    assert s.seed == _from(generate_pb2.SamplingParams()).seed  # derived from the request id
    assert s.seed != _from(generate_pb2.SamplingParams(), request_id="r2").seed
    assert _from(generate_pb2.SamplingParams(seed=0)).seed == 0  # an explicit 0 is kept


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (generate_pb2.SamplingParams(temperature=-1), "sampling.temperature"),
        (generate_pb2.SamplingParams(top_p=0.0), "sampling.top_p"),
        (generate_pb2.SamplingParams(top_p=1.5), "sampling.top_p"),
        (generate_pb2.SamplingParams(max_tokens=0), "sampling.max_tokens"),
        (generate_pb2.SamplingParams(max_tokens=1001), "sampling.max_tokens"),
        (generate_pb2.SamplingParams(stop=["ok", ""]), "sampling.stop[1]"),
        (generate_pb2.SamplingParams(stop=["x"] * 17), "sampling.stop"),
        (generate_pb2.SamplingParams(stop_token_ids=[5, 300]), "sampling.stop_token_ids[1]"),
    ],
)
def test_bad_sampling_names_the_field(msg: generate_pb2.SamplingParams, field: str) -> None:
    with pytest.raises(RequestError) as info:
        _from(msg)
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")


def test_empty_prompt_and_id_are_refused() -> None:
    with pytest.raises(RequestError, match="^prompt: the prompt is empty"):
        GenerationRequest("r", (), SamplingConfig())
    with pytest.raises(RequestError, match="^request_id"):
        GenerationRequest("", (1,), SamplingConfig())
