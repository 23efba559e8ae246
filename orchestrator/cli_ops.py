"""The operator commands of `tandem`: serve, status, scale, drain, down, token.

`serve` runs a deployment on an embedded local Ray and writes the state file (orchestrator/state.py)
that the other commands read; they talk to the deployment's admin HTTP API with the admin token.
Every address and token can also come from a flag or the environment (TANDEM_HTTP_ADDRESS,
TANDEM_ADMIN_TOKEN).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.spec import CpuTopology, SpecError, load_spec
from orchestrator.state import ServeState, state_path

_out = Console()
_err = Console(stderr=True)


def _fail(message: str) -> None:
    _err.print(f"error: {message}", markup=False, highlight=False)
    raise typer.Exit(1)


def _admin(http_address: str | None, token: str | None) -> tuple[str, str | None]:
    state = ServeState.read()
    addr = http_address or (state.http_address if state else None)
    if addr is None:
        _fail("no deployment: pass --http-address, set TANDEM_HTTP_ADDRESS, or start one with `tandem serve`")
    return addr, token or (state.admin_token if state else None)


def _call(method: str, path: str, http_address: str | None, token: str | None,
          body: dict | None = None) -> dict:
    import httpx

    addr, tok = _admin(http_address, token)
    headers = {"authorization": f"Bearer {tok}"} if tok else {}
    try:
        r = httpx.request(method, addr.rstrip("/") + path, json=body, headers=headers, timeout=600)
    except httpx.HTTPError as exc:
        _fail(f"cannot reach the deployment at {addr}: {exc}")
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail") or r.json().get("error", {}).get("message")
        except ValueError:
            detail = r.text
        _fail(f"{method} {path}: HTTP {r.status_code}: {detail}")
    return r.json()


def _print_status(status: dict) -> None:
    t = Table(title=f"deployment '{status['name']}': {'ready' if status['ready'] else 'NOT ready'}")
    for col in ("instance", "role", "ranks", "state", "running", "queued", "KV blocks", "gen"):
        t.add_column(col)
    for i in status["instances"]:
        t.add_row(i["id"], i["role"], str(i["ranks"]), i["state"], str(i.get("running", "")),
                  str(i.get("queued", "")), f"{i.get('kv_blocks_used', 0)}/{i.get('kv_blocks_total', 0)}",
                  str(i.get("generation", 1)))
    _out.print(t)
    auto = status.get("autoscale") or {}
    if auto.get("enabled") and auto.get("last"):
        for pool in ("prefill", "decode"):
            d = auto["last"][pool]
            _out.print(f"autoscale {pool}: {d['current']} -> {d['target']} ({d['reason']}: {d['detail']})",
                       markup=False, highlight=False)
    _out.print(f"gRPC router: {status['router_address']}    HTTP API: {status['http_address']}")


HttpOpt = typer.Option(None, "--http-address", envvar="TANDEM_HTTP_ADDRESS", help="HTTP API, http://host:port.")
TokenOpt = typer.Option(None, "--token", envvar="TANDEM_ADMIN_TOKEN", help="Admin bearer token.")


def serve(spec: Path = typer.Argument(..., help="Deployment spec YAML (deploy/local.yaml runs on this CPU)."),
          placement_timeout: float = typer.Option(120.0, help="Seconds to wait for resources per instance.")
          ) -> None:
    """Run a deployment on an embedded local Ray until Ctrl-C; writes the state file other commands read."""
    try:
        parsed = load_spec(spec)
    except SpecError as exc:
        _fail(str(exc))
    import ray

    from orchestrator.controller import NAMESPACE
    from orchestrator.deploy import controller_for

    cpus = parsed.topology.num_cpus if isinstance(parsed.topology, CpuTopology) else None
    ray.init(address="local", num_cpus=cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
             namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    try:
        with _out.status(f"starting '{parsed.name}' (placing instances, loading the model)..."):
            ctl, status = controller_for(parsed, placement_timeout_s=placement_timeout)
        tokens = ray.get(ctl.tokens.remote())
        path = ServeState(parsed.name, status["router_address"], status["http_address"], tokens["token"],
                          tokens["admin_token"], os.getpid()).write()
        _print_status(status)
        _out.print(f"state file: {path} (0600). Ctrl-C stops the deployment.")
        stop: list[int] = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        try:
            while not stop:
                time.sleep(0.5)
                try:
                    ray.get(ctl.status.remote(), timeout=30)
                except ray.exceptions.RayError:
                    break  # `tandem down` took it away
        except KeyboardInterrupt:
            pass
        with contextlib.suppress(ray.exceptions.RayError):  # already gone after `tandem down`
            ray.get(ctl.down.remote(), timeout=60)
    finally:
        state = ServeState.read()
        if state is not None and state.pid == os.getpid():
            state_path().unlink(missing_ok=True)
        ray.shutdown()


def status(as_json: bool = typer.Option(False, "--json", help="Print the status object as JSON."),
           http_address: str | None = HttpOpt, token: str | None = TokenOpt) -> None:
    """The deployment's instances, their state and load; `ready` when every instance can serve."""
    st = _call("GET", "/v1/status", http_address, token)
    typer.echo(json.dumps(st)) if as_json else _print_status(st)


def scale(prefill: int | None = typer.Option(None, "--prefill", min=0, help="Prefill instances wanted."),
          decode: int | None = typer.Option(None, "--decode", min=1, help="Decode instances wanted."),
          as_json: bool = typer.Option(False, "--json"), http_address: str | None = HttpOpt,
          token: str | None = TokenOpt) -> None:
    """Grow or shrink the pools (either flag alone); shrinking drains instances first."""
    if prefill is None and decode is None:
        _fail("give --prefill, --decode or both")
    st = _call("POST", "/v1/scale", http_address, token, {"prefill": prefill, "decode": decode})
    typer.echo(json.dumps(st)) if as_json else _print_status(st)


def drain(worker: str = typer.Argument(..., help="Instance to drain, e.g. decode-1 (or decode-1/r0)."),
          timeout: float = typer.Option(60.0, help="Seconds to let running requests finish."),
          as_json: bool = typer.Option(False, "--json"), http_address: str | None = HttpOpt,
          token: str | None = TokenOpt) -> None:
    """Stop routing to an instance, let its requests finish, then remove it."""
    st = _call("POST", "/v1/drain", http_address, token, {"worker": worker, "timeout_s": timeout})
    typer.echo(json.dumps(st)) if as_json else _print_status(st)


def down(http_address: str | None = HttpOpt, token: str | None = TokenOpt) -> None:
    """Take the deployment down: every instance and the router."""
    _call("POST", "/v1/down", http_address, token)
    typer.echo("deployment going down")


def token(admin: bool = typer.Option(False, "--admin", help="Print the admin token instead.")) -> None:
    """Print the client bearer token of the running `tandem serve` (for other clients)."""
    state = ServeState.read()
    if state is None:
        _fail(f"no state file at {state_path()}: start a deployment with `tandem serve`")
    typer.echo(state.admin_token if admin else state.token)


def register(app: typer.Typer) -> None:
    for fn in (serve, status, scale, drain, down, token):
        app.command(fn.__name__)(fn)
