"""`make demo`: the main job on the embedded default (local Ray, deploy/local.yaml).

It validates the spec, starts a local Ray on 127.0.0.1, deploys the spec through the controller
(one prefill and one decode instance of the tiny DeepSeek-V4 model), streams a few generations
through the gRPC router (every one disaggregated: prefill worker, handoff, decode worker), and
prints what it measured: TTFT, TPOT, the workers that served each request, the KV bytes moved and
the prefix hit rate. Nothing here is made up: every number comes from the deployment's answers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from rich.console import Console
from rich.table import Table

from orchestrator.spec import CpuTopology, DeploymentSpec, SpecError, load_spec

_out = Console(width=None if sys.stdout.isatty() else 110)
_LONG = ("Disaggregated serving splits prefill and decode across two pools of workers. The router picks a "
         "prefill worker and a decode worker for every request. Compressed KV blocks move from prefill to "
         "decode over NIXL. DeepSeek-V4 keeps its KV cache small, so long contexts stay affordable. Tandem")
PROMPTS = (
    "The router picks",
    "Compressed KV blocks move",
    _LONG,  # over 256 tokens: its first block can be served from a prefix cache ...
    _LONG,  # ... when it comes again
)


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


def _generate(address: str, token: str, prompt: str, max_tokens: int) -> tuple[str, object, float]:
    from orchestrator.router.client import generate, make_request, open_channel

    text = []
    last = None
    t0 = time.perf_counter()
    with open_channel(address) as ch:
        for chunk in generate(ch, make_request(prompt=prompt, max_tokens=max_tokens, ignore_eos=True),
                              token=token, timeout_s=300):
            text.append(chunk.text)
            _out.print(chunk.text, end="", markup=False, highlight=False)
            last = chunk
    _out.print()
    return "".join(text), last, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="deployment spec YAML (the embedded default is deploy/local.yaml)")
    ap.add_argument("--max-tokens", type=int, default=24, help="tokens per generation")
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not isinstance(spec.topology, CpuTopology):
        print(f"{args.spec}: the demo runs on this machine's CPU; topology '{spec.topology.kind}' is for "
              "`ray job submit` to a GPU cluster", file=sys.stderr)
        return 2
    _out.print(_spec_table(spec))
    import ray

    from orchestrator.controller import NAMESPACE
    from orchestrator.deploy import controller_for

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=spec.topology.num_cpus, _node_ip_address="127.0.0.1",
             include_dashboard=False, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    ctl = None
    try:
        with _out.status("starting the deployment (router, prefill and decode workers)..."):
            ctl, status = controller_for(spec, placement_timeout_s=120)
        token = ray.get(ctl.tokens.remote())["token"]
        _out.print(f"deployment ready in {time.perf_counter() - t0:.1f} s: gRPC {status['router_address']}, "
                   f"HTTP {status['http_address']}")
        rows = []
        for prompt in PROMPTS:
            shown = prompt if len(prompt) < 60 else f"{prompt[:30]}...{prompt[-25:]}"
            _out.print(f"\n[bold]> {shown}[/]", end="")
            _, last, wall = _generate(status["router_address"], token, prompt, args.max_tokens)
            rows.append((prompt, last, wall))
        _summary(rows)
    finally:
        if ctl is not None:
            ray.get(ctl.down.remote())
        ray.shutdown()
    return 0


def _summary(rows: list) -> None:
    t = Table(title="summary (measured by the router and the workers)")
    for col in ("req", "prefill", "decode", "prompt", "cached", "out", "TTFT ms", "TPOT ms", "NIXL bytes"):
        t.add_column(col)
    for i, (_, c, _) in enumerate(rows):
        t.add_row(str(i), c.prefill_worker, c.decode_worker, str(c.usage.prompt_tokens),
                  str(c.usage.cached_tokens), str(c.usage.completion_tokens), f"{c.timing.ttft_s * 1e3:.0f}",
                  f"{c.timing.tpot_s * 1e3:.1f}", str(c.kv_transfer_bytes))
    _out.print(t)
    prompt = sum(c.usage.prompt_tokens for _, c, _ in rows)
    cached = sum(c.usage.cached_tokens for _, c, _ in rows)
    moved = sum(c.kv_transfer_bytes for _, c, _ in rows)
    _out.print(f"TTFT median {statistics.median(c.timing.ttft_s for _, c, _ in rows) * 1e3:.0f} ms, "
               f"TPOT median {statistics.median(c.timing.tpot_s for _, c, _ in rows) * 1e3:.1f} ms, "
               f"prefix hit rate {cached / prompt:.0%} of prompt tokens, KV bytes over NIXL {moved}")
    if moved == 0:
        _out.print("[yellow]note:[/] no KV moved over NIXL: every request ended at its prefill or was "
                   "prefilled on its decode worker (see router.disaggregation in the spec).")


if __name__ == "__main__":
    sys.exit(main())
