"""The HTTP API application: OpenAI-compatible routes, admin routes, /metrics and /healthz."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from orchestrator.api.admin import Admin, make_admin_router
from orchestrator.api.auth import Auth
from orchestrator.api.body_limit import BodyLimit
from orchestrator.api.openai import error_response, make_openai_router
from orchestrator.router.frontend import Frontend
from orchestrator.router.quotas import DEFAULT_MAX_REQUEST_BYTES


def create_app(frontend: Frontend, *, model_name: str, auth: Auth, registry: CollectorRegistry,
               admin: Admin | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The app; admin routes only when an Admin (the controller) is given. Bodies over
    max_request_bytes are refused with 413 before they reach a route."""
    app = FastAPI(title="Tandem", summary="DeepSeek-V4 serving with disaggregated prefill and decode")
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body")
        lines = "; ".join(".".join(str(p) for p in e["loc"] if p != "body") + ": " + e["msg"]
                          for e in exc.errors())
        return error_response(400, lines, "invalid_request_error", param)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """200 when a request can be routed now; 503 with the reason until then (see
        orchestrator/router/readiness.py)."""
        r = frontend.readiness()
        return JSONResponse({"ready": r.ready, **({} if r.ready else {"reason": r.reason})},
                            status_code=200 if r.ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(make_openai_router(frontend, model_name, auth))
    if admin is not None:
        app.include_router(make_admin_router(admin, auth))
    return app
