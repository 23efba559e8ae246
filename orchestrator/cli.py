"""`tandem`: the operator's command line (typer + rich).

Commands arrive with the parts they drive; each read command takes `--json`. Errors are one
readable line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from orchestrator.spec import SpecError, load_spec

app = typer.Typer(
    name="tandem",
    help="Tandem: disaggregated prefill/decode serving of DeepSeek-V4 on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_err = Console(stderr=True)


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


if __name__ == "__main__":
    app()
