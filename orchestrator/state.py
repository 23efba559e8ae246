"""The local state file that `tandem serve` writes and the other commands read.

It holds where the deployment listens and its tokens, so it is created readable by the user only
(0600) in a directory only the user can enter. Commands take an explicit flag first, then the
environment (TANDEM_ADDRESS, TANDEM_HTTP_ADDRESS, TANDEM_TOKEN), then this file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


def state_path() -> Path:
    """$TANDEM_STATE, else ~/.tandem/state.json."""
    env = os.environ.get("TANDEM_STATE")
    return Path(env) if env else Path.home() / ".tandem" / "state.json"


@dataclass(frozen=True)
class ServeState:
    """What a running `tandem serve` publishes to its user's other commands."""

    name: str
    router_address: str  # host:port of the gRPC router
    http_address: str  # http://host:port of the HTTP API (OpenAI-compatible, admin, metrics)
    token: str  # bearer token for generation clients
    admin_token: str  # bearer token for admin endpoints
    pid: int

    def write(self, path: Path | None = None) -> Path:
        """Write atomically with mode 0600; returns the path."""
        p = path or state_path()
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f)
        os.replace(tmp, p)
        return p

    @staticmethod
    def read(path: Path | None = None) -> ServeState | None:
        """The state file's contents, or None when there is none (nothing is being served)."""
        p = path or state_path()
        if not p.is_file():
            return None
        try:
            return ServeState(**json.loads(p.read_text()))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{p}: not a Tandem state file ({exc}); remove it") from None
