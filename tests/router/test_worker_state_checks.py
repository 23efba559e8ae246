"""`WorkerState` validation: the fast accept path lets every good report through and leaves every
bad field to the detailed checks, which name it."""

from __future__ import annotations

import pytest

from orchestrator.router.inputs import Role, WorkerId, WorkerState

pytestmark = pytest.mark.router

GOOD = {"queued_prefill_tokens": 0, "kv_blocks_used": 0, "kv_blocks_total": 1, "running_requests": 0,
        "max_running_requests": 1, "queue_length": 0, "queue_limit": 1, "max_queued_prefill_tokens": 1}


def _state(domain: str = "r0", rate: float = 1.0, **fields: float) -> WorkerState:
    return WorkerState(WorkerId("w"), Role.DECODE, domain, rate, **(GOOD | fields))


def test_boundary_values_are_accepted() -> None:
    s = _state()
    assert (s.kv_blocks_total, s.queue_limit, s.queued_prefill_tokens) == (1, 1, 0)


@pytest.mark.parametrize("field", ["queued_prefill_tokens", "kv_blocks_used", "running_requests", "queue_length"])
def test_a_negative_count_is_named(field: str) -> None:
    with pytest.raises(ValueError, match=rf"WorkerState\(w/0\)\.{field} = -1: must be >= 0"):
        _state(**{field: -1})


@pytest.mark.parametrize("field", ["kv_blocks_total", "max_running_requests", "queue_limit",
                                   "max_queued_prefill_tokens"])
def test_a_zero_limit_is_named(field: str) -> None:
    with pytest.raises(ValueError, match=rf"WorkerState\(w/0\)\.{field} = 0: must be >= 1"):
        _state(**{field: 0})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rate": 0.0}, r"prefill_rate_tps = 0.0: must be > 0"),
    ({"rate": float("nan")}, r"prefill_rate_tps = nan: must be > 0"),
    ({"domain": ""}, r"nvlink_domain = '': must be non-empty"),
])
def test_rate_and_domain_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _state(**kwargs)
