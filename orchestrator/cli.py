"""`tandem`: the operator's command line (typer + rich).

Commands arrive with the parts they drive; each read command takes `--json`. Errors are one
readable line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import json
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
    message: list[str] = typer.Option(
        [], "--message", metavar="ROLE:TEXT",
        help="A chat turn (repeatable, in order); ROLE is system, developer, user or assistant. The router "
             "renders the conversation with the model's chat encoding; the last turn must be the user's."),
    system: str | None = typer.Option(None, "--system", help="Chat: a system turn, before every --message."),
    user: str | None = typer.Option(None, "--user", help="Chat: a user turn, put after every --message."),
    thinking: bool = typer.Option(False, "--thinking",
                                  help="Chat: thinking mode; the reasoning streams first (dimmed)."),
    tools: Path | None = typer.Option(None, "--tools", metavar="FILE",
                                      help="Chat: a JSON array of OpenAI function tools the model may call; "
                                           "its calls are printed after the answer."),
    reasoning_effort: str | None = typer.Option(None, "--reasoning-effort", metavar="high|max",
                                                help="Chat: how hard to reason; implies --thinking ('max' "
                                                     "adds the encoding's maximum-effort instruction)."),
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
    """Stream a generation from the router; text to stdout, or JSON lines with --json. The input is
    --prompt, --token-ids, or a chat (--message/--system/--user): a chat prints its reasoning dimmed
    before the answer and its tool calls after it (JSON lines carry reasoning_text and tool_calls).
    With --logprobs the text is followed by one line per token: id, logprob, then the alternatives."""
    import grpc
    from rich.console import Console

    from orchestrator.cli_chat import ChatOptionError, ChatPrinter, conversation, load_tools, parse_effort
    from orchestrator.router.client import chunk_to_json, logprob_line, make_request, open_channel
    from orchestrator.router.client import generate as stream
    from orchestrator.state import ServeState

    try:
        turns = conversation(system, message, user)
        effort = parse_effort(reasoning_effort) if reasoning_effort is not None else None
        offered = load_tools(tools) if tools is not None else []
    except ChatOptionError as exc:
        _fail(str(exc))
    chat = "--message/--system/--user"
    given = [o for o, on in (("--prompt", prompt is not None), ("--token-ids", token_ids is not None),
                             (chat, bool(turns))) if on]
    if len(given) != 1:
        _fail(f"give exactly one of --prompt, --token-ids and {chat}, got {', '.join(given) or 'none'}")
    chat_only = [o for o, on in (("--thinking", thinking), ("--tools", tools is not None),
                                 ("--reasoning-effort", effort is not None)) if on]
    if chat_only and not turns:
        _fail(f"{', '.join(chat_only)}: only with a chat ({chat}), not with {given[0]}")
    state = ServeState.read()
    addr = address or (state.router_address if state else None)
    if addr is None:
        _fail("no router address: pass --address, set TANDEM_ADDRESS, or start one with `tandem serve`")
    tok = token or (state.token if state else None)
    request = make_request(prompt=prompt, token_ids=_token_ids(token_ids) if token_ids else None,
                           messages=turns or None, thinking=thinking or effort is not None, tools=offered,
                           reasoning_effort=effort, max_tokens=max_tokens, temperature=temperature, seed=seed,
                           ignore_eos=ignore_eos, session_id=session, logprobs=logprobs)
    printer = ChatPrinter(Console())
    lines: list[str] = []
    try:
        with open_channel(addr) as channel:
            for chunk in stream(channel, request, token=tok, timeout_s=timeout):
                if as_json:
                    typer.echo(json.dumps(chunk_to_json(chunk), separators=(",", ":")))
                else:
                    printer.chunk(chunk)
                    lines += [logprob_line(lp) for lp in chunk.logprobs]
    except grpc.RpcError as exc:
        _fail(f"{exc.code().name}: {exc.details()}")
    if not as_json:
        printer.close()
        for line in lines:
            typer.echo(line)


def _fail(message: str) -> None:
    # soft_wrap: one line whatever the terminal's width (scripts read the first line).
    _err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


if __name__ == "__main__":
    app()
