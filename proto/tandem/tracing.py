"""One trace id per request, in every component's log lines and, when OpenTelemetry is importable,
in its spans.

The router makes the id (`GenerationRequest.trace_id`, 32 hex digits) and returns it in the final
chunk; prefill and decode ranks get it with the request. Each component logs one INFO line per
stage of a request on the logger `tandem.trace`:

    trace_id=<id> request_id=<id> component=<router|prefill|decode> worker=<name> stage=<stage> k=v ...

Lines carry counts, times, worker names and error names only: never prompt text or token ids
(they are the user's data). A request without a trace id (an engine driven directly) logs
`trace_id=-`.

Where the lines go: a process whose logging nobody configured (a Ray actor: no handler anywhere)
would drop INFO records, so `RequestTracer` then gives `tandem.trace` one stderr handler, which Ray
writes to the actor's log file (`<session dir>/logs/worker-*-<pid>.err`). A process that configured
logging keeps its own handlers.

Spans: `make_spans()` decides once per process, at the first tracer, and logs its choice once:
- OpenTelemetry importable: one span per request and component (`tandem.router`, `tandem.prefill`,
  `tandem.decode`) from admission to the component's last stage, with the stages as span events.
  The span's OpenTelemetry trace id IS the request's trace id (128 bits), and every component's
  span is a child of the same remote parent (span id = the trace id's low 64 bits), so the
  components' spans form one trace without passing span contexts around. They go to the
  process's tracer provider: recorded and exported only where the process installed an SDK
  provider (the OpenTelemetry API alone records nothing, by design).
- Not importable: `NoSpans`; the log lines are the trace.
"""

from __future__ import annotations

import enum
import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Protocol

TRACE_LOGGER = "tandem.trace"
LIVE_LIMIT = 65536  # requests a tracer follows at once; beyond it the oldest is closed (a leak guard)

Field = int | float | str


class Stage(enum.Enum):
    """The stages a component logs for a request."""

    ADMITTED = "admitted"  # taken by the component (router: validated and tokenised)
    ROUTED = "routed"  # router: a (prefill, decode) pair was booked
    PREFILL_DONE = "prefill_done"  # prefill: first token sampled, handoff held for the decode
    HANDOFF_PULLED = "handoff_pulled"  # decode: the prompt's KV came over NIXL (or Ray, tests)
    HANDOFF_RECOMPUTED = "handoff_recomputed"  # decode: the handoff could not be used; prompt recomputed
    FINISHED = "finished"  # ended normally (stop, length) or cancelled by the router/client
    ABORTED = "aborted"  # the component could not serve it (worker failure, router error status)


class Spans(Protocol):
    """Where a tracer sends spans. Methods are keyed by request id; unknown ids are ignored."""

    def open(self, trace_id: str, request_id: str, name: str) -> None: ...

    def event(self, request_id: str, stage: Stage, fields: Mapping[str, Field]) -> None: ...

    def close(self, request_id: str, error: str | None) -> None: ...


class NoSpans:
    """No span backend in this process: the log lines are the trace."""

    def open(self, trace_id: str, request_id: str, name: str) -> None:
        return None

    def event(self, request_id: str, stage: Stage, fields: Mapping[str, Field]) -> None:
        return None

    def close(self, request_id: str, error: str | None) -> None:
        return None


class OtelSpans:
    """Spans through an OpenTelemetry tracer (see the module docstring for the trace layout)."""

    def __init__(self, tracer: object) -> None:
        from opentelemetry import trace

        self._trace = trace
        self._tracer = tracer
        self._open: dict[str, object] = {}

    def open(self, trace_id: str, request_id: str, name: str) -> None:
        tid = otel_trace_id(trace_id)
        if tid is None:  # no 128-bit trace id to join: the log line says trace_id=-
            return
        t = self._trace
        parent = t.SpanContext(trace_id=tid, span_id=(tid & 0xFFFFFFFFFFFFFFFF) or 1, is_remote=True,
                               trace_flags=t.TraceFlags(t.TraceFlags.SAMPLED))
        ctx = t.set_span_in_context(t.NonRecordingSpan(parent))
        self._open[request_id] = self._tracer.start_span(  # type: ignore[attr-defined]
            name, context=ctx, attributes={"tandem.request_id": request_id, "tandem.trace_id": trace_id})

    def event(self, request_id: str, stage: Stage, fields: Mapping[str, Field]) -> None:
        span = self._open.get(request_id)
        if span is not None:
            span.add_event(stage.value, attributes=dict(fields))  # type: ignore[attr-defined]

    def close(self, request_id: str, error: str | None) -> None:
        span = self._open.pop(request_id, None)
        if span is None:
            return
        if error is not None:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))  # type: ignore[attr-defined]
        span.end()  # type: ignore[attr-defined]


def otel_trace_id(trace_id: str) -> int | None:
    """The 128-bit OpenTelemetry trace id of a Tandem trace id; None when it is not 32 hex digits
    (or all zeros, which OpenTelemetry reserves for 'invalid')."""
    if len(trace_id) != 32:
        return None
    try:
        value = int(trace_id, 16)
    except ValueError:
        return None
    return value or None


_choice_lock = threading.Lock()
_choice_logged = False  # the once-per-process log of the span backend (not distributed state)


def make_spans(component: str) -> Spans:
    """The span backend of this process: OpenTelemetry when importable, else NoSpans. The choice is
    logged once per process (WARNING when there is no OpenTelemetry, so it is never silent)."""
    global _choice_logged
    log = logging.getLogger(TRACE_LOGGER)
    try:
        from opentelemetry import trace
    except ImportError:
        chosen: Spans = NoSpans()
        msg, level = ("OpenTelemetry is not installed: request spans are off; trace ids are in the "
                      "tandem.trace log lines only"), logging.WARNING
    else:
        chosen = OtelSpans(trace.get_tracer("tandem"))
        provider = type(trace.get_tracer_provider()).__name__
        msg, level = (f"request spans go to OpenTelemetry (tracer provider {provider}; only an SDK "
                      f"provider records them)"), logging.INFO
    with _choice_lock:
        if not _choice_logged:
            _choice_logged = True
            log.log(level, "%s: %s", component, msg)
    return chosen


def _ensure_output(log: logging.Logger) -> None:
    """Give `log` a stderr handler when no handler would take its records (see the docstring)."""
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    if not log.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        log.addHandler(handler)


class RequestTracer:
    """One component's per-request stage lines and spans (see the module docstring).

    `begin` starts following a request (ADMITTED), `stage` logs a middle stage, `end` logs the last
    stage and forgets it. `stage` and `end` on a request not followed (never begun, or ended
    already) do nothing, so a component may report an ending from several places."""

    def __init__(self, component: str, worker: str, spans: Spans | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.component, self.worker = component, worker
        self.log = logger or logging.getLogger(TRACE_LOGGER)
        _ensure_output(self.log)
        self.spans = spans if spans is not None else make_spans(component)
        self._live: OrderedDict[str, str] = OrderedDict()  # request id -> trace id

    def begin(self, trace_id: str, request_id: str, **fields: Field) -> None:
        """Follow a request from its admission here."""
        self._live[request_id] = trace_id
        if len(self._live) > LIVE_LIMIT:
            old, old_trace = self._live.popitem(last=False)
            self._line(old_trace, old, Stage.ABORTED, {"error": "untracked: over LIVE_LIMIT requests"})
            self.spans.close(old, "untracked")
        self.spans.open(trace_id, request_id, f"tandem.{self.component}")
        self._emit(trace_id, request_id, Stage.ADMITTED, fields)

    def stage(self, request_id: str, stage: Stage, **fields: Field) -> None:
        trace_id = self._live.get(request_id)
        if trace_id is not None:
            self._emit(trace_id, request_id, stage, fields)

    def end(self, request_id: str, stage: Stage, **fields: Field) -> None:
        trace_id = self._live.pop(request_id, None)
        if trace_id is None:
            return
        self._emit(trace_id, request_id, stage, fields)
        error = fields.get("error") if stage is Stage.ABORTED else None
        self.spans.close(request_id, str(error) if error is not None else None)

    def following(self) -> int:
        """Requests begun and not ended."""
        return len(self._live)

    def _emit(self, trace_id: str, request_id: str, stage: Stage, fields: Mapping[str, Field]) -> None:
        self.spans.event(request_id, stage, fields)
        self._line(trace_id, request_id, stage, fields)

    def _line(self, trace_id: str, request_id: str, stage: Stage, fields: Mapping[str, Field]) -> None:
        extra = "".join(f" {k}={_fmt(v)}" for k, v in fields.items())
        level = logging.WARNING if stage is Stage.ABORTED else logging.INFO
        self.log.log(level, "trace_id=%s request_id=%s component=%s worker=%s stage=%s%s",
                     trace_id or "-", request_id, self.component, self.worker, stage.value, extra)


def _fmt(v: Field) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, str) and (not v or any(c.isspace() for c in v)):
        return repr(v)
    return str(v)
