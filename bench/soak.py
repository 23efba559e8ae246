"""Soak: a local deployment held at a steady load for a while; errors, p99 latency, memory growth.

It starts its own Ray (127.0.0.1, no dashboard) and deployment (deploy/local.yaml by default),
then:
1. ramp: closed-loop gRPC Generate clients at concurrency 1, 2, 4, 8, 16 (--step-seconds each)
   until the goodput (requests/s that ended OK) stops growing by 10 % or errors appear: the best
   step is the measured capacity, the baseline the hold is compared with;
2. hold: the smallest ramp concurrency whose goodput was >= --hold-fraction of capacity (0.6),
   for --seconds (600), one client more whenever a --sample-every window falls below that rate (the
   machine is shared); the RSS of the router actor and of every worker actor process is sampled
   after a warm-up (the memory baseline) and at the end (and every --sample-every seconds between);
3. stops everything it started (deployment, controller, Ray).

The workload is deterministic (--seed): token-id prompts, 60 % of them opening with one of 8
shared 300-token prefixes (prefix-cache hits, partial-block tails), 40 % unique; 16-400 tokens
after the prefix; 4..--max-tokens output tokens with ignore_eos, so every request does the same
work in every run. Memory is VmRSS from /proc (psutil is not a dependency).

    python -P bench/soak.py [--seconds 600] [--json PATH] [--spec deploy/local.yaml]

JSON: requests, errors (by gRPC code), p99_s, memory_growth ((end - start) / start of the summed
RSS), plus capacity, the ramp, the hold's load, the per-process RSS and any process that went away
(its instance replaced by the controller: a FAIL).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

RAMP = (1, 2, 4, 8, 16)
KNEE_GAIN = 1.10  # a step must beat the best so far by 10 % to count as more capacity
SHARED_PREFIXES, PREFIX_TOKENS = 8, 300


@dataclass(frozen=True)
class Outcome:
    """One request as the client saw it."""

    start_s: float  # since the run's start
    latency_s: float
    code: str  # "OK" or the gRPC status name
    tokens: int


@dataclass(frozen=True)
class StepResult:
    concurrency: int
    seconds: float
    requests: int
    ok: int
    goodput_rps: float
    tokens_per_s: float
    p50_s: float
    p99_s: float
    errors: dict[str, int]


@dataclass(frozen=True)
class Proc:
    name: str
    pid: int


class Workload:
    """Deterministic requests (see the module docstring); thread-safe."""

    def __init__(self, seed: int, max_tokens: int) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.max_tokens = max_tokens
        self.prefixes = [[self._rng.randrange(256) for _ in range(PREFIX_TOKENS)] for _ in range(SHARED_PREFIXES)]

    def next(self) -> tuple[list[int], int]:
        with self._lock:
            r = self._rng
            body = [r.randrange(256) for _ in range(r.randint(16, 400))]
            prompt = (r.choice(self.prefixes) + body) if r.random() < 0.6 else body
            return prompt, r.randint(4, self.max_tokens)


class LoadPool:
    """Closed-loop gRPC clients that send requests until `end` (monotonic); clients can join while
    it runs. Every request started is awaited (its time counts)."""

    def __init__(self, address: str, token: str | None, workload: Workload, t0: float, end: float) -> None:
        self.address, self.token, self.workload, self.t0, self.end = address, token, workload, t0, end
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    @property
    def clients(self) -> int:
        return len(self._threads)

    def add(self, n: int = 1) -> None:
        for _ in range(n):
            t = threading.Thread(target=self._client, daemon=True)
            self._threads.append(t)
            t.start()

    def join(self) -> list[Outcome]:
        for t in list(self._threads):
            t.join()
        return self.outcomes

    def ok_done_between(self, a_s: float, b_s: float) -> int:
        """Requests that ended OK between a_s and b_s (seconds since t0)."""
        with self._lock:
            return sum(1 for o in self.outcomes if o.code == "OK" and a_s <= o.start_s + o.latency_s < b_s)

    def _client(self) -> None:
        import grpc

        from orchestrator.router.client import generate, make_request, open_channel

        with open_channel(self.address) as ch:
            while time.monotonic() < self.end:
                prompt, max_tokens = self.workload.next()
                start = time.monotonic()
                code, n = "OK", 0
                try:
                    for chunk in generate(ch, make_request(token_ids=prompt, max_tokens=max_tokens,
                                                           ignore_eos=True), token=self.token, timeout_s=120):
                        n += len(chunk.token_ids)
                except grpc.RpcError as exc:
                    code = exc.code().name
                done = Outcome(start - self.t0, time.monotonic() - start, code, n)
                with self._lock:
                    self.outcomes.append(done)


def run_load(address: str, token: str | None, workload: Workload, concurrency: int, seconds: float,
             t0: float) -> list[Outcome]:
    """`concurrency` closed-loop clients for `seconds`."""
    pool = LoadPool(address, token, workload, t0, time.monotonic() + seconds)
    pool.add(concurrency)
    return pool.join()


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no samples."""
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s))) - 1))]


def summarize(concurrency: int, seconds: float, outcomes: list[Outcome]) -> StepResult:
    ok = [o for o in outcomes if o.code == "OK"]
    lat = [o.latency_s for o in ok]
    errors = dict(Counter(o.code for o in outcomes if o.code != "OK"))
    return StepResult(concurrency, seconds, len(outcomes), len(ok), len(ok) / seconds,
                      sum(o.tokens for o in ok) / seconds, percentile(lat, 50), percentile(lat, 99), errors)


def ramp(address: str, token: str | None, workload: Workload, step_s: float, t0: float) -> list[StepResult]:
    """Concurrency steps until goodput stops growing by KNEE_GAIN or errors appear."""
    steps: list[StepResult] = []
    best = 0.0
    for c in RAMP:
        start = time.monotonic()
        outcomes = run_load(address, token, workload, c, step_s, t0)
        res = summarize(c, time.monotonic() - start, outcomes)  # the stragglers' tail counts as time
        steps.append(res)
        print(f"  ramp c={c}: {res.goodput_rps:.2f} req/s, p99 {res.p99_s:.2f} s, errors {res.errors}",
              flush=True)
        if res.errors or res.goodput_rps < best * KNEE_GAIN:
            break
        best = max(best, res.goodput_rps)
    return steps


def rss_bytes(pid: int) -> int:
    """VmRSS of a live process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"/proc/{pid}/status has no VmRSS line")


def deployment_processes(status: dict) -> list[Proc]:
    """The router actor's and every worker rank actor's process, by asking each actor its pid."""
    import ray

    from orchestrator.controller import NAMESPACE, ROUTER_NAME
    from workers.actor_common import actor_name

    handles = [("router", ray.get_actor(ROUTER_NAME, namespace=NAMESPACE))]
    for inst in status["instances"]:
        for rank in range(inst["ranks"]):
            handles.append((f"{inst['id']}/r{rank}", ray.get_actor(actor_name(inst["id"], rank),
                                                                   namespace=NAMESPACE)))
    pids = ray.get([h.__ray_call__.remote(lambda _self: os.getpid()) for _, h in handles], timeout=60)
    return [Proc(name, pid) for (name, _), pid in zip(handles, pids, strict=True)]


def sample_rss(procs: list[Proc]) -> tuple[dict[str, int], list[Proc]]:
    """RSS by "name pid" of the processes still alive, and the ones that are gone."""
    got, gone = {}, []
    for p in procs:
        try:
            got[f"{p.name} {p.pid}"] = rss_bytes(p.pid)
        except (FileNotFoundError, ProcessLookupError):
            gone.append(p)
    return got, gone


def hold(address: str, token: str | None, workload: Workload, concurrency: int, target_rps: float,
         max_clients: int, seconds: float, warmup_s: float, sample_every_s: float,
         find_procs: Callable[[], list[Proc]], t0: float
         ) -> tuple[list[Outcome], list[tuple[float, dict[str, int]]], list[dict], list[dict]]:
    """Run the hold; every sample_every_s, a window whose goodput fell below target_rps (the machine
    got slower: it is shared) adds a client, up to max_clients. RSS is sampled from the warm-up on
    and at the end (before the load stops). A process that went away (the controller replaced its
    instance) is recorded, and the deployment's processes are found again."""
    start = time.monotonic()
    pool = LoadPool(address, token, workload, t0, start + seconds)
    pool.add(concurrency)
    samples: list[tuple[float, dict[str, int]]] = []
    replaced: list[dict] = []
    windows: list[dict] = []
    procs = find_procs()
    ticks = [k * sample_every_s for k in range(1, int(seconds / sample_every_s) + 1) if k * sample_every_s < seconds - 1]
    for t in [*ticks, seconds - 1.0]:
        time.sleep(max(0.0, start + t - time.monotonic()))
        now = time.monotonic() - start
        a = windows[-1]["t_s"] if windows else 0.0
        rps = pool.ok_done_between(start - t0 + a, start - t0 + now) / (now - a)
        windows.append({"t_s": now, "goodput_rps": rps, "clients": pool.clients})
        if rps < target_rps and pool.clients < max_clients:
            pool.add()
            print(f"  {now:.0f} s: {rps:.2f} req/s < {target_rps:.2f}: now {pool.clients} clients", flush=True)
        if now < warmup_s:
            continue
        got, gone = sample_rss(procs)
        samples.append((now, got))
        if gone:
            replaced += [{"t_s": now, "process": p.name, "pid": p.pid} for p in gone]
            print(f"  {now:.0f} s: gone: {', '.join(f'{p.name} (pid {p.pid})' for p in gone)}", flush=True)
            procs = find_procs()
    return pool.join(), samples, replaced, windows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="length of the hold (default 600)")
    ap.add_argument("--spec", default="deploy/local.yaml")
    ap.add_argument("--step-seconds", type=float, default=10.0, help="length of each ramp step")
    ap.add_argument("--hold-fraction", type=float, default=0.6, help="hold load as a fraction of capacity")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds of the hold before the memory baseline (default: 15 %% of --seconds, 10-60)")
    ap.add_argument("--sample-every", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = ap.parse_args(argv)
    if args.hold_fraction < 0.5:
        ap.error(f"--hold-fraction must be >= 0.5, got {args.hold_fraction}")
    warmup = args.warmup if args.warmup is not None else min(60.0, max(10.0, 0.15 * args.seconds))
    if not 0 < warmup < args.seconds - 2:
        ap.error(f"--warmup {warmup} must leave time in --seconds {args.seconds}")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("UCX_NET_DEVICES", "lo")

    import ray

    from orchestrator.deploy import controller_for
    from orchestrator.spec import load_spec

    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    ctl = None
    try:
        print(f"starting {args.spec} ...", flush=True)
        ctl, status = controller_for(load_spec(args.spec), placement_timeout_s=120)
        token = ray.get(ctl.tokens.remote())["token"]
        address = status["router_address"]
        def find_procs() -> list[Proc]:
            return deployment_processes(ray.get(ctl.status.remote(), timeout=60))

        deployment_processes(status)  # every actor answers its pid before the load starts
        workload = Workload(args.seed, args.max_tokens)
        t0 = time.monotonic()
        print("ramp (capacity):", flush=True)
        steps = ramp(address, token, workload, args.step_seconds, t0)
        best = max(steps, key=lambda s: s.goodput_rps)
        target = args.hold_fraction * best.goodput_rps
        chosen = min((s for s in steps if s.goodput_rps >= target and not s.errors),
                     key=lambda s: s.concurrency, default=best)
        print(f"hold: concurrency {chosen.concurrency} for {args.seconds:g} s "
              f"(capacity {best.goodput_rps:.2f} req/s at c={best.concurrency})", flush=True)
        outcomes, samples, replaced, windows = hold(
            address, token, workload, chosen.concurrency, args.hold_fraction * best.goodput_rps,
            best.concurrency, args.seconds, warmup, args.sample_every, find_procs, t0)
        report = build_report(args, steps, best, chosen, outcomes, samples, replaced, warmup)
        report["hold"]["windows"] = windows
        report["hold"]["clients_at_end"] = windows[-1]["clients"] if windows else chosen.concurrency
    finally:
        if ctl is not None:
            try:
                ray.get(ctl.down.remote(), timeout=120)
            finally:
                ray.kill(ctl)
        ray.shutdown()
    print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def build_report(args: argparse.Namespace, steps: list[StepResult], best: StepResult, chosen: StepResult,
                 outcomes: list[Outcome], samples: list[tuple[float, dict[str, int]]], replaced: list[dict],
                 warmup: float) -> dict:
    """The JSON report. Memory growth is over the processes alive at both samples (same pid)."""
    held = summarize(chosen.concurrency, args.seconds, outcomes)
    (t_start, start), (t_end, end) = samples[0], samples[-1]
    both = [k for k in start if k in end]
    start, end = {k: start[k] for k in both}, {k: end[k] for k in both}
    total_start, total_end = sum(start.values()), sum(end.values())
    return {
        "requests": held.requests,
        "errors": held.errors,
        "p99_s": held.p99_s,
        "memory_growth": (total_end - total_start) / total_start,
        # Less sensitive to one sample's allocator noise: median of the first 3 vs the last 3 samples.
        "memory_growth_median3": _median3_growth([sum(v.get(k, 0) for k in both) for _, v in samples]),
        "hold": {"seconds": args.seconds, "concurrency": chosen.concurrency, "ok": held.ok,
                 "goodput_rps": held.goodput_rps, "tokens_per_s": held.tokens_per_s, "p50_s": held.p50_s,
                 "load_fraction_of_capacity": held.goodput_rps / best.goodput_rps,
                 "warmup_s": warmup},
        "capacity": {"goodput_rps": best.goodput_rps, "concurrency": best.concurrency},
        "ramp": [asdict(s) for s in steps],
        "rss_bytes": {k: {"start": start[k], "end": end[k]} for k in both},
        "replaced": replaced,
        "rss_samples": [{"t_s": t, "total": sum(v.get(k, 0) for k in both), "by_process": v} for t, v in samples],
        "rss_window_s": [t_start, t_end],
        "spec": args.spec, "seed": args.seed, "max_tokens": args.max_tokens,
        "machine": f"{os.cpu_count()} CPUs, shared; Python {sys.version.split()[0]}",
    }


def _median3_growth(totals: list[int]) -> float:
    k = min(3, len(totals) // 2) or 1
    first, last = sorted(totals[:k])[k // 2], sorted(totals[-k:])[k // 2]
    return (last - first) / first


def print_report(r: dict) -> None:
    mib = 1 / 2**20
    print("\nramp (baseline: capacity measured in this run)")
    print(f"{'conc':>4} {'requests':>8} {'ok req/s':>9} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7}  errors")
    for s in r["ramp"]:
        print(f"{s['concurrency']:>4} {s['requests']:>8} {s['goodput_rps']:>9.2f} {s['tokens_per_s']:>7.1f} "
              f"{s['p50_s']:>7.2f} {s['p99_s']:>7.2f}  {s['errors'] or '-'}")
    h, c = r["hold"], r["capacity"]
    print(f"\nhold: {h['seconds']:g} s at concurrency {h['concurrency']}->{h['clients_at_end']} = "
          f"{h['goodput_rps']:.2f} req/s, "
          f"{100 * h['load_fraction_of_capacity']:.0f} % of capacity {c['goodput_rps']:.2f} req/s")
    print(f"{'requests':>8} {'errors':>16} {'p50 s':>7} {'p99 s':>7} {'tok/s':>7}")
    print(f"{r['requests']:>8} {str(r['errors'] or 0):>16} {h['p50_s']:>7.2f} {r['p99_s']:>7.2f} "
          f"{h['tokens_per_s']:>7.1f}")
    t0, t1 = r["rss_window_s"]
    print(f"\nRSS (baseline: after {t0:.0f} s of the hold's warm-up; end: at {t1:.0f} s)")
    print(f"{'process':<16} {'pid':>8} {'start MiB':>10} {'end MiB':>10} {'growth':>8}")
    for key, v in r["rss_bytes"].items():
        name, pid = key.rsplit(" ", 1)
        print(f"{name:<16} {pid:>8} {v['start'] * mib:>10.1f} {v['end'] * mib:>10.1f} "
              f"{100 * (v['end'] - v['start']) / v['start']:>7.2f}%")
    tot_s = sum(v["start"] for v in r["rss_bytes"].values())
    tot_e = sum(v["end"] for v in r["rss_bytes"].values())
    print(f"{'total':<16} {'':>8} {tot_s * mib:>10.1f} {tot_e * mib:>10.1f} {100 * r['memory_growth']:>7.2f}%")
    trend = " ".join(f"{s['total'] * mib:.0f}" for s in r["rss_samples"])
    print(f"total RSS every sample (MiB): {trend}")
    print(f"growth, median of the first 3 samples -> median of the last 3: "
          f"{100 * r['memory_growth_median3']:.2f}%")
    for g in r["replaced"]:
        print(f"process gone during the hold: {g['process']} (pid {g['pid']}) at {g['t_s']:.0f} s")
    ok = (not r["errors"] and r["memory_growth"] < 0.05 and not r["replaced"]
          and h["load_fraction_of_capacity"] >= 0.5)
    verdict = "PASS" if ok else "FAIL"
    print(f"\ntarget: zero errors, < 5 % memory growth, no process replaced, hold >= 50 % of capacity: {verdict}")


if __name__ == "__main__":
    sys.exit(main())
