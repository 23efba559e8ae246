"""`tandem`: the operator's command line (typer + rich).

Commands arrive with the parts they drive; each read command takes `--json`. Errors are one
readable line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from orchestrator.cli_ops import register as register_ops
from orchestrator.planner.commands import register as register_planner
from orchestrator.spec import SpecError, load_spec

app = typer.Typer(
    name="tandem",
    help="Tandem: disaggregated prefill/decode serving of DeepSeek-V4 on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_err = Console(stderr=True)
register_ops(app)  # serve, status, scale, drain, down, token
register_planner(app)  # simulate, estimate, plan


@app.callback()
def _main() -> None:
    """Operate a Tandem deployment: validate specs, plan fleets, serve and scale."""


@app.command()
def validate(
    spec: Path = typer.Argument(..., help="Deployment spec YAML (see deploy/)."),
    as_json: bool = typer.Option(False, "--json", help="Print the normalised spec as JSON."),
) -> None:
    """Check a deployment spec: one line per mistake, with the field path and the bad value."""
    try:
        parsed = load_spec(spec)
    except SpecError as exc:
        _err.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(parsed.model_dump(mode="json")))
    else:
        typer.echo(f"{spec}: valid spec '{parsed.name}' ({parsed.topology.kind}, "
                   f"{parsed.prefill.instances} prefill x EP{parsed.prefill.ep_ranks}, "
                   f"{parsed.decode.instances} decode x EP{parsed.decode.ep_ranks})")


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise typer.BadParameter(f"--token-ids must be integers separated by commas, got {text!r}") from None


@app.command()
def generate(
    prompt: str | None = typer.Option(None, "--prompt", help="Prompt text (tokenised by the router)."),
    token_ids: str | None = typer.Option(None, "--token-ids", help="Prompt as token ids: '1,2,3'."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    seed: int | None = typer.Option(None, "--seed", min=0, help="Sampling seed."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep going past end-of-sequence."),
    session: str = typer.Option("", "--session", help="Session id: a conversation's turns stick together."),
    logprobs: int | None = typer.Option(None, "--logprobs", min=0, max=20, metavar="N",
                                        help="Each token's logprob and the N most likely alternatives."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per streamed chunk."),
    address: str | None = typer.Option(None, "--address", envvar="TANDEM_ADDRESS", help="Router host:port."),
    token: str | None = typer.Option(None, "--token", envvar="TANDEM_TOKEN", help="Bearer token."),
    timeout: float = typer.Option(600.0, "--timeout", min=0.1, help="Seconds before giving up."),
) -> None:
    """Stream a generation from the router; text to stdout, or JSON lines with --json. With
    --logprobs the text is followed by one line per token: id, logprob, then the alternatives."""
    import grpc

    from orchestrator.router.client import chunk_to_json, logprob_line, make_request, open_channel
    from orchestrator.router.client import generate as stream
    from orchestrator.state import ServeState

    if (prompt is None) == (token_ids is None):
        _fail("give exactly one of --prompt and --token-ids")
    state = ServeState.read()
    addr = address or (state.router_address if state else None)
    if addr is None:
        _fail("no router address: pass --address, set TANDEM_ADDRESS, or start one with `tandem serve`")
    tok = token or (state.token if state else None)
    request = make_request(prompt=prompt, token_ids=_token_ids(token_ids) if token_ids else None,
                           max_tokens=max_tokens, temperature=temperature, seed=seed,
                           ignore_eos=ignore_eos, session_id=session, logprobs=logprobs)
    lines: list[str] = []
    try:
        with open_channel(addr) as channel:
            for chunk in stream(channel, request, token=tok, timeout_s=timeout):
                if as_json:
                    typer.echo(json.dumps(chunk_to_json(chunk), separators=(",", ":")))
                else:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                    lines += [logprob_line(lp) for lp in chunk.logprobs]
    except grpc.RpcError as exc:
        _fail(f"{exc.code().name}: {exc.details()}")
    if not as_json:
        typer.echo()
        for line in lines:
            typer.echo(line)


def _fail(message: str) -> None:
    _err.print(f"error: {message}", markup=False, highlight=False)
    raise typer.Exit(1)


if __name__ == "__main__":
    app()
