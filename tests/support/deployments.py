"""One local deployment per end-to-end test module: started from a spec, handed to the module's
tests, taken down after the last one (even when a test replaced the controller: `dep["ctl"]`)."""

from __future__ import annotations

from collections.abc import Iterator

from orchestrator.deploy import controller_for
from orchestrator.spec import DeploymentSpec


def module_deployment(ray_session: object, spec: DeploymentSpec) -> Iterator[dict]:
    """Yield {"ctl": controller, "status": its status, "token": ..., "admin_token": ...}; then down."""
    ctl, status = controller_for(spec, placement_timeout_s=60)
    tokens = ray_session.get(ctl.tokens.remote())
    dep = {"ctl": ctl, "status": status, **tokens}
    try:
        yield dep
    finally:
        try:
            ray_session.get(dep["ctl"].down.remote(), timeout=60)
        finally:
            ray_session.kill(dep["ctl"])
