"""`python -m orchestrator.deploy SPEC`: the entry point for `ray job submit`.

It validates the spec (a broken one prints one line per mistake and starts nothing), connects to
the cluster, starts the deployment's controller (a detached named actor) or applies the spec to
the running one as a rolling change, prints the status, and exits leaving the deployment running.
`--wait` stays attached and takes the deployment down on Ctrl-C.

    ray job submit --working-dir . -- python -m orchestrator.deploy deploy/local.yaml
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from orchestrator.spec import DeploymentSpec, SpecError, load_spec


def controller_for(spec: DeploymentSpec, *, placement_timeout_s: float = 120.0):  # noqa: ANN201
    """The deployment's controller: the running one (the spec applied as a rolling change,
    `Controller.apply`) or a new one."""
    import ray

    from orchestrator.controller import CONTROLLER_NAME, NAMESPACE, ControllerActor

    if spec.model.checkpoint is not None:  # workers may run elsewhere: a relative path means "from here"
        absolute = str(Path(spec.model.checkpoint).resolve())
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"checkpoint": absolute})})

    try:
        ctl = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        ctl = ControllerActor.options(name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached",
                                      num_cpus=0, max_concurrency=1000).remote(
            spec.model_dump(mode="json"), placement_timeout_s=placement_timeout_s)
        return ctl, ray.get(ctl.start.remote())
    running = ray.get(ctl.status.remote())
    if running["name"] != spec.name:
        raise RuntimeError(f"the cluster already runs deployment {running['name']!r}; take it down first "
                           f"(`tandem down`) to start {spec.name!r}")
    return ctl, ray.get(ctl.apply.remote(spec.model_dump(mode="json")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orchestrator.deploy", description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="deployment spec YAML")
    ap.add_argument("--address", default="auto", help="Ray cluster address (default: the job's cluster)")
    ap.add_argument("--wait", action="store_true", help="stay attached; Ctrl-C takes the deployment down")
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 2
    import ray

    from orchestrator.controller import NAMESPACE

    ray.init(address=args.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        ctl, status = controller_for(spec)
    except (RuntimeError, FileNotFoundError, ValueError) as exc:
        print(f"deploy {args.spec}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status))
    if not args.wait:
        return 0
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    ray.get(ctl.down.remote())
    ray.kill(ctl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
