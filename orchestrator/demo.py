"""`make demo`: the main job on the embedded default (local Ray, deploy/local.yaml).

It validates the spec, starts a local Ray on 127.0.0.1, and runs as much of the serving path as
exists in this build. Parts that are not built yet are named, never imitated: the demo prints
only what it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from orchestrator.spec import CpuTopology, DeploymentSpec, SpecError, load_spec

_out = Console()


@dataclass(frozen=True)
class Part:
    """A piece of the serving path and the module that provides it."""

    name: str
    module: str


PATH = (
    Part("DeepSeek-V4 model (tiny preset)", "workers.model"),
    Part("paged KV pools and prefix cache", "workers.kv"),
    Part("prefill / decode worker actors", "workers.prefill"),
    Part("KV handoff over NIXL", "workers.transfer"),
    Part("KV-aware router (gRPC)", "orchestrator.router.server"),
    Part("controller (placement, scaling)", "orchestrator.controller"),
)


def _built(part: Part) -> bool:
    try:
        return importlib.util.find_spec(part.module) is not None
    except ModuleNotFoundError:
        return False


def _spec_table(spec: DeploymentSpec) -> Table:
    t = Table(title=f"deployment '{spec.name}'", show_header=False)
    model = spec.model.preset.value if spec.model.preset else spec.model.checkpoint
    t.add_row("model", f"{model} ({spec.model.dtype.value})")
    for role, pool in (("prefill", spec.prefill), ("decode", spec.decode)):
        t.add_row(role, f"{pool.instances} instance(s) x EP{pool.ep_ranks}, max batch {pool.max_batch}")
    t.add_row("topology", spec.topology.kind)
    t.add_row("router", f"{spec.router.host}, policy {spec.router.policy.value}, "
                        f"disaggregation {spec.router.disaggregation.mode.value}")
    t.add_row("transfer", f"{spec.transfer.backend.value}, lease {spec.transfer.lease_s:g} s")
    return t


def _start_ray(spec: DeploymentSpec) -> dict[str, float]:
    import ray

    cpus = spec.topology.num_cpus if isinstance(spec.topology, CpuTopology) else 2
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    resources = ray.cluster_resources()
    _out.print(f"local Ray up on 127.0.0.1 in {time.perf_counter() - t0:.1f} s: "
               f"{resources.get('CPU', 0):g} CPUs, {resources.get('memory', 0) / 2**30:.1f} GiB")
    return resources


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="deployment spec YAML (the embedded default is deploy/local.yaml)")
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not isinstance(spec.topology, CpuTopology):
        print(f"{args.spec}: the demo runs on this machine's CPU; topology '{spec.topology.kind}' "
              "is for `ray job submit` to a GPU cluster", file=sys.stderr)
        return 2
    _out.print(_spec_table(spec))
    import ray

    try:
        _start_ray(spec)
        status = Table(title="serving path in this build")
        status.add_column("part")
        status.add_column("state")
        missing = []
        for part in PATH:
            ok = _built(part)
            status.add_row(part.name, "[green]built[/]" if ok else "[yellow]not built yet[/]")
            if not ok:
                missing.append(part.name)
    finally:
        ray.shutdown()
    _out.print(status)
    if missing:
        _out.print("[bold]summary:[/] no generations were run: the serving path is not complete in this "
                   f"build (missing: {', '.join(missing)}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
