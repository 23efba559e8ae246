"""tandem.tracing: per-request stage lines keyed by trace id, and OpenTelemetry spans whose trace id
is the request's."""

from __future__ import annotations

import logging
import sys
import uuid

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import tandem.tracing as tracing
from tandem.tracing import NoSpans, OtelSpans, RequestTracer, Stage, make_spans, otel_trace_id

pytestmark = pytest.mark.foundation


def _tracer(name: str, spans: tracing.Spans | None = None) -> RequestTracer:
    return RequestTracer("decode", "decode-0/r0", spans=spans or NoSpans(), logger=logging.getLogger(name))


def _lines(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name]


def test_every_stage_line_names_the_trace_and_ends_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    t = _tracer("t.stages")
    tid = uuid.uuid4().hex
    t.begin(tid, "req-1", prompt_tokens=300, kv="handoff")
    t.stage("req-1", Stage.HANDOFF_PULLED, bytes=4096, seconds=0.00125)
    t.end("req-1", Stage.FINISHED, reason="length", completion_tokens=6)
    t.end("req-1", Stage.ABORTED, error="late")  # already ended: nothing
    t.stage("req-2", Stage.HANDOFF_PULLED, bytes=1)  # never begun: nothing
    assert _lines(caplog, "t.stages") == [
        f"trace_id={tid} request_id=req-1 component=decode worker=decode-0/r0 stage=admitted "
        "prompt_tokens=300 kv=handoff",
        f"trace_id={tid} request_id=req-1 component=decode worker=decode-0/r0 stage=handoff_pulled "
        "bytes=4096 seconds=0.00125",
        f"trace_id={tid} request_id=req-1 component=decode worker=decode-0/r0 stage=finished "
        "reason=length completion_tokens=6",
    ]
    assert t.following() == 0


def test_aborted_is_a_warning_and_a_missing_trace_id_is_a_dash(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    t = _tracer("t.abort")
    t.begin("", "r", prompt_tokens=3)
    t.end("r", Stage.ABORTED, error="engine loop failed: boom")
    recs = [r for r in caplog.records if r.name == "t.abort"]
    assert [r.levelno for r in recs] == [logging.INFO, logging.WARNING]
    assert recs[1].getMessage() == ("trace_id=- request_id=r component=decode worker=decode-0/r0 "
                                    "stage=aborted error='engine loop failed: boom'")


def test_followed_requests_are_bounded(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(tracing, "LIVE_LIMIT", 3)
    t = _tracer("t.bound")
    for i in range(5):
        t.begin(f"{i:032x}", f"r{i}")
    assert t.following() == 3
    evicted = [m for m in _lines(caplog, "t.bound") if "stage=aborted" in m]
    assert [m.split()[1] for m in evicted] == ["request_id=r0", "request_id=r1"]


def test_an_unconfigured_logger_gets_a_stderr_handler_at_info() -> None:
    name = f"t.bare.{uuid.uuid4().hex}"
    log = logging.getLogger(name)
    log.propagate = False  # as in a process whose logging nobody configured
    RequestTracer("router", "router", spans=NoSpans(), logger=log)
    assert log.level == logging.INFO
    assert [type(h) for h in log.handlers] == [logging.StreamHandler] and log.handlers[0].stream is sys.stderr


def test_otel_spans_carry_the_request_trace_id_and_its_stages() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    spans = OtelSpans(provider.get_tracer("test"))
    router, decode = (RequestTracer(c, w, spans=spans, logger=logging.getLogger("t.otel"))
                      for c, w in (("router", "router"), ("decode", "decode-0/r0")))
    tid = uuid.uuid4().hex
    router.begin(tid, "req", prompt_tokens=10)
    router.stage("req", Stage.ROUTED, prefill="prefill-0/r0", decode="decode-0/r0")
    decode.begin(tid, "req2", prompt_tokens=10)
    decode.end("req2", Stage.ABORTED, error="RuntimeError")
    router.end("req", Stage.FINISHED, reason="stop")
    got = {s.name: s for s in exporter.get_finished_spans()}
    assert set(got) == {"tandem.router", "tandem.decode"}
    want_trace = int(tid, 16)
    for s in got.values():  # one trace; both children of the same remote parent
        assert s.context.trace_id == want_trace
        assert s.parent is not None and s.parent.span_id == want_trace & 0xFFFFFFFFFFFFFFFF
    r = got["tandem.router"]
    assert [e.name for e in r.events] == ["admitted", "routed", "finished"]
    assert dict(r.events[1].attributes) == {"prefill": "prefill-0/r0", "decode": "decode-0/r0"}
    assert r.attributes["tandem.trace_id"] == tid and r.status.status_code is StatusCode.UNSET
    d = got["tandem.decode"]
    assert d.status.status_code is StatusCode.ERROR and d.status.description == "RuntimeError"


@pytest.mark.parametrize("raw,want", [("0" * 31 + "1", 1), ("f" * 32, 2**128 - 1), ("0" * 32, None),
                                      ("abc", None), ("g" * 32, None), ("", None)])
def test_otel_trace_id_accepts_only_128_bit_hex(raw: str, want: int | None) -> None:
    assert otel_trace_id(raw) == want


def test_without_opentelemetry_spans_are_off_and_that_is_logged_once(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import fails as when not installed
    monkeypatch.setattr(tracing, "_choice_logged", False)
    assert isinstance(make_spans("prefill"), NoSpans)
    assert isinstance(make_spans("decode"), NoSpans)
    said = [r for r in caplog.records if r.name == tracing.TRACE_LOGGER]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "OpenTelemetry is not installed" in said[0].getMessage()


def test_with_opentelemetry_the_choice_is_otel(caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(tracing, "_choice_logged", False)
    assert isinstance(make_spans("router"), OtelSpans)
    said = [r.getMessage() for r in caplog.records if r.name == tracing.TRACE_LOGGER]
    assert len(said) == 1 and said[0].startswith("router: request spans go to OpenTelemetry")
