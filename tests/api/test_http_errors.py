"""The HTTP API's refusals: OpenAI-shaped errors with the router's status mapped to HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import httpx
import pytest
from prometheus_client import CollectorRegistry
from support.gateways import full_worker, refusing_frontend

from orchestrator.api.app import create_app
from orchestrator.api.auth import Auth
from orchestrator.router.inputs import Role, WorkerState

pytestmark = pytest.mark.router





def _call(method: str, path: str, *, reports: Sequence[WorkerState] = (), json: dict | None = None,
          token: str | None = None, client_token: str | None = None) -> httpx.Response:
    registry = CollectorRegistry()
    frontend = refusing_frontend(reports, registry)
    app = create_app(frontend, model_name="tiny", auth=Auth(client_token, None), registry=registry)
    headers = {"authorization": f"Bearer {token}"} if token else {}

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.request(method, path, json=json, headers=headers)

    return asyncio.run(go())


def test_models_lists_the_served_model() -> None:
    r = _call("GET", "/v1/models")
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["tiny"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "tiny", "prompt": "hi", "best_of": 2}, 400, "best_of"),
        ({"model": "tiny", "prompt": "hi", "n": 2}, 400, "n"),
        ({"model": "tiny", "prompt": ""}, 400, ""),
        ({"model": "tiny", "prompt": "hi", "temperature": 3}, 400, "temperature"),
        ({"model": "other", "prompt": "hi"}, 404, "model"),
        ({"model": "tiny", "prompt": [1, 999]}, 400, "token_ids[1]"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 2000}, 400, "sampling.max_tokens"),
    ],
)
def test_bad_completion_bodies(body: dict, status: int, param: str) -> None:
    r = _call("POST", "/v1/completions", reports=[full_worker("decode-0", Role.DECODE)], json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and (param == "" or err["param"] == param)


def test_no_workers_is_503_and_full_queues_429() -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}]}
    assert _call("POST", "/v1/chat/completions", json=body).status_code == 503
    full = [full_worker("decode-0", Role.DECODE), full_worker("prefill-0", Role.PREFILL)]
    assert _call("POST", "/v1/chat/completions", reports=full, json=body).status_code == 429


def test_client_token_is_required_when_set() -> None:
    body = {"model": "tiny", "prompt": "hi"}
    assert _call("POST", "/v1/completions", json=body, client_token="t0k").status_code == 401
    assert _call("POST", "/v1/completions", json=body, client_token="t0k", token="bad").status_code == 401
    assert _call("POST", "/v1/completions", json=body, client_token="t0k", token="t0k").status_code == 503
    assert _call("GET", "/healthz", client_token="t0k").status_code == 200


def test_metrics_are_prometheus_text() -> None:
    r = _call("GET", "/metrics")
    assert r.status_code == 200 and "tandem_router_ttft_seconds_bucket" in r.text
