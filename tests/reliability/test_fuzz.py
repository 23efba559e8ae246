"""Hypothesis fuzz (derandomized, at most 50 examples each) of the router's front door and of specs.

Generate: random requests (garbage strings, huge numbers, NaN, both/neither prompt forms, chat
messages, bad sampling, tiny deadlines, oversized messages, right/wrong/missing tokens) against a
real gRPC server over the serving in-memory gateway. Each call must end within a bound with one of
the documented statuses, and the ones that can be predicted exactly (auth, deadline) are checked.
HTTP: random bodies to completions and chat answer with a documented status and an error body.
Specs: random values, mutations of a valid spec and random YAML text must give a spec or SpecError.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from support.serving import serving_frontend

from orchestrator.api.app import create_app
from orchestrator.api.auth import Auth
from orchestrator.router.quotas import RequestLimits
from orchestrator.router.server import start_server
from orchestrator.router.tenancy import Credentials, Tenant, TenantToken
from orchestrator.spec import DeploymentSpec, SpecError, load_spec, parse_spec
from tandem.v1 import generate_pb2, generate_pb2_grpc

pytestmark = pytest.mark.reliability

FUZZ = settings(max_examples=50, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAUTHENTICATED}
CALL_BOUND_S = 5.0
TOKEN = "fuzz-token"
U32, U64 = 2**32 - 1, 2**64 - 1


class _ServerThread:
    """The gRPC server on its own event loop in a thread, so hypothesis can drive it synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the fuzz server did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self.frontend, self.gateway = serving_frontend(CollectorRegistry(), RequestLimits(max_request_bytes=65536))
        creds = Credentials([TenantToken(Tenant("fuzz"), TOKEN)], admin_token="fuzz-admin")
        self.server, self.port = await start_server(self.frontend, port=0, credentials=creds,
                                                    max_request_bytes=65536)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def stub():  # noqa: ANN201
    server = _ServerThread()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield generate_pb2_grpc.RouterStub(ch), server
    server.stop()


_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)
_short = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=8)
_floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
_sane_sampling = st.builds(
    generate_pb2.SamplingParams,
    temperature=st.floats(0, 2, width=32), top_p=st.none() | st.floats(0.25, 1, width=32),
    top_k=st.integers(0, 50), seed=st.none() | st.integers(0, U64), max_tokens=st.none() | st.integers(1, 64),
    stop=st.lists(_short, max_size=3), stop_token_ids=st.lists(st.integers(0, 258), max_size=3),
    ignore_eos=st.booleans(),
)
_garbage_sampling = st.builds(
    generate_pb2.SamplingParams,
    temperature=_floats, top_p=st.none() | _floats, top_k=st.integers(0, U32), seed=st.none() | st.integers(0, U64),
    max_tokens=st.none() | st.integers(0, 600) | st.integers(0, U32),
    stop=st.lists(_text, max_size=20), stop_token_ids=st.lists(st.integers(0, U32), max_size=70),
    ignore_eos=st.booleans(), logprobs=st.booleans(), top_logprobs=st.integers(0, 30) | st.integers(0, U32),
)
_message = st.builds(generate_pb2.ChatMessage, role=st.sampled_from(["user", "assistant", "system", "tool", "", "??"])
                     | _text, content=_text, name=_text, tool_call_id=_text)


@st.composite
def _request(draw: st.DrawFn) -> generate_pb2.GenerateRequest:
    """Mostly well-formed requests (so the OK path is fuzzed too), then every kind of garbage."""
    req = generate_pb2.GenerateRequest()
    shape = draw(st.sampled_from(["prompt", "ids", "huge", "prompt", "ids", "messages", "both", "neither"]))
    if shape in ("prompt", "both"):
        req.prompt = draw(_text.filter(bool))
    if shape in ("ids", "both"):
        req.token_ids.extend(draw(st.lists(st.integers(0, 258), min_size=1, max_size=600)
                                  | st.lists(st.integers(0, U32), min_size=1, max_size=5)))
    if shape == "messages":
        req.messages.extend(draw(st.lists(_message, min_size=1, max_size=3)))
    if shape == "huge":  # past the 64 KiB message limit
        req.prompt = draw(st.sampled_from(["x" * 70_000, "\u00e9" * 40_000]))
    req.sampling.CopyFrom(draw(_sane_sampling | _garbage_sampling))
    req.deadline_ms = draw(st.sampled_from([0, 0, 1, 0, 0, 20]) | st.integers(0, U32))
    for name in ("request_id", "session_id", "cache_salt"):
        setattr(req, name, draw(st.just("") | _text))
    return req


@FUZZ
@given(req=_request(), token=st.sampled_from([TOKEN] * 6 + ["wrong", None]))
def test_generate_fuzz_ends_in_time_with_a_documented_status(stub, req: generate_pb2.GenerateRequest,  # noqa: ANN001
                                                             token: str | None) -> None:
    router, _ = stub
    md = (("authorization", f"Bearer {token}"),) if token else None
    start = time.monotonic()
    chunks = []
    try:
        for chunk in router.Generate(req, metadata=md, timeout=2 * CALL_BOUND_S):
            chunks.append(chunk)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
    took = time.monotonic() - start
    assert code in DOCUMENTED, (code, req)
    assert took < CALL_BOUND_S, f"{took:.1f} s for {req}"
    if code is grpc.StatusCode.OK:
        assert chunks and chunks[-1].finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED
    if token != TOKEN and req.ByteSize() < 65536:
        assert code == grpc.StatusCode.UNAUTHENTICATED
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        assert req.deadline_ms > 0  # the request's own deadline, never the client's bound


def test_fuzzed_streams_leave_no_slot_held(stub) -> None:  # noqa: ANN001
    _, server = stub
    assert server.frontend.slots._clients == {} and server.frontend.slots._tenants == {}


HTTP_DOCUMENTED = {200, 400, 401, 404, 413, 429, 503, 504}
_json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | _text
_json = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(_text, inner, max_size=3), max_leaves=8)
_SANE_FIELDS = {  # values the API accepts
    "max_tokens": st.integers(1, 16), "temperature": st.floats(0, 2), "top_p": st.floats(0.25, 1),
    "top_k": st.integers(0, 50), "seed": st.integers(0, 2**63), "stop": st.lists(_short, max_size=3),
    "stream": st.booleans(), "ignore_eos": st.booleans(), "user": _short,
}
_GARBAGE_FIELDS = {  # anything, including values the API must refuse
    "max_tokens": st.integers(-5, 2**40) | _json, "temperature": st.floats() | _json, "top_p": _json,
    "top_k": st.integers(-1, 2**40), "seed": st.integers(-1, 2**65), "stop": st.lists(_text, max_size=20) | _json,
    "logprobs": st.booleans() | st.integers(-1, 30), "top_logprobs": st.integers(-1, 30), "n": st.integers(0, 3),
    "echo": st.booleans(), "prompt": _json, "messages": _json,
}
_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                            "content": _text}), max_size=3)


@st.composite
def _http_call(draw: st.DrawFn) -> tuple[str, dict, str | None]:
    """Mostly valid bodies (OK, refusals by the router), some garbage (refusals by the API)."""
    chat = draw(st.booleans())
    body: dict = {"model": draw(st.sampled_from(["tiny", "tiny", "tiny", "other"]))}
    if chat:
        body["messages"] = draw(_messages) + [{"role": "user", "content": draw(_text)}]
    else:
        body["prompt"] = draw(_text.filter(bool) | st.lists(st.integers(0, 258), min_size=1, max_size=300)
                              | st.lists(st.integers(0, 2**33), min_size=1, max_size=3).filter(lambda ids: max(ids) > 258))
    for name, strategy in _SANE_FIELDS.items():
        if draw(st.integers(0, 2)) == 0:
            body[name] = draw(strategy)
    if draw(st.integers(0, 3)) == 3:  # (hypothesis leans to small integers: garbage is the big one)
        name = draw(st.sampled_from(sorted(_GARBAGE_FIELDS)))
        body[name] = draw(_GARBAGE_FIELDS[name])
    if draw(st.integers(0, 5)) == 5:
        body[draw(_short)] = draw(_json)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return path, body, draw(st.sampled_from([TOKEN] * 6 + ["wrong", None]))


@FUZZ
@given(call=_http_call())
def test_http_fuzz_answers_with_a_documented_status(call: tuple[str, dict, str | None]) -> None:
    path, body, token = call
    registry = CollectorRegistry()
    frontend, _ = serving_frontend(registry)
    creds = Credentials([TenantToken(Tenant("fuzz"), TOKEN)], admin_token="fuzz-admin")
    app = create_app(frontend, model_name="tiny", auth=Auth(credentials=creds), registry=registry,
                     max_request_bytes=65536)
    headers = {"authorization": f"Bearer {token}"} if token else {}

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await asyncio.wait_for(c.post(path, json=body, headers=headers), CALL_BOUND_S)

    r = asyncio.run(go())
    assert r.status_code in HTTP_DOCUMENTED, (r.status_code, r.text[:500], body)
    if token != TOKEN:
        assert r.status_code in (401, 413)
    if r.status_code != 200:
        assert r.json()["error"]["message"] if r.status_code != 401 else r.json()["detail"]


BASE = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "local.yaml").read_text())
_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | _text
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(_text | st.integers(), inner, max_size=4), max_leaves=12)
_FIELDS = ["name", "model", "prefill", "decode", "topology", "router", "transfer", "security", "limits",
           "autoscale", "kind", "preset", "instances", "ep_ranks", "policy", "tls", "tenants", "token_file",
           "max_request_bytes", "max_streams_per_client", "host", "port", "disaggregation", "mode"]


def _check(parse) -> DeploymentSpec | None:  # noqa: ANN001
    """Run a parse: a spec or SpecError pass; any other exception fails the test."""
    try:
        return parse()
    except SpecError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        return None


@FUZZ
@given(data=_values)
def test_spec_fuzz_random_values(data: object) -> None:
    _check(lambda: parse_spec(data))


def _mutate(doc: object, path: list[str], value: object) -> object:
    """doc with the value at `path` replaced (dicts along the way are created or replaced)."""
    if not path:
        return value
    out = dict(doc) if isinstance(doc, dict) else {}
    out[path[0]] = _mutate(out.get(path[0]), path[1:], value)
    return out


@FUZZ
@given(edits=st.lists(st.tuples(st.lists(st.sampled_from(_FIELDS), min_size=1, max_size=3), _values),
                      min_size=1, max_size=4))
def test_spec_fuzz_mutations_of_a_valid_spec(edits: list) -> None:
    doc: object = BASE
    for path, value in edits:
        doc = _mutate(doc, path, value)
    _check(lambda: parse_spec(doc))


@FUZZ
@given(text=_text | st.builds(yaml.safe_dump, _values))
@example(text="name: 2001-13-01")  # yaml's timestamp constructor raises ValueError
@example(text="&a [*a]")
@example(text="&a {b: *a}")
@example(text="[" * 1000)  # nested past the recursion limit
@example(text="a: !!python/object:os.system x")
@example(text="\x00")
def test_spec_fuzz_yaml_text(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "spec.yaml"
        path.write_text(text, encoding="utf-8")
        _check(lambda: load_spec(path))


def test_spec_file_that_is_not_text_is_a_spec_error(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"name: \xff\xfe\x00bad")
    with pytest.raises(SpecError, match="byte 6: not UTF-8 text"):
        load_spec(path)
