"""The operator's path: `ray start --head`, `ray job submit --working-dir .` of a spec, a generation
through the router it started, teardown; a broken spec submitted as a job fails and starts nothing.

The one test that runs its own Ray head (with the dashboard, which serves the job API).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from orchestrator.router.client import generate, make_request, open_channel

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):  # noqa: ANN001, ANN201
    tmp = tmp_path_factory.mktemp("rayhead")
    ray_tmp = tempfile.mkdtemp(prefix="tr", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    gcs, dash = _port(), _port()
    # Token authentication stays on: the cluster and every client of it share one token.
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_DEDUP_LOGS": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # the job's `python` is this venv's
    # --block keeps `ray start` in the foreground: the head lives in its own process group, and
    # teardown ends exactly that group (`ray stop` would stop every Ray cluster on the machine).
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                             "--num-cpus", "2", "--temp-dir", ray_tmp, "--disable-usage-stats",
                             # every port of its own: the suite's other Ray cluster holds the defaults
                             "--dashboard-agent-listen-port", str(_port()), "--dashboard-agent-grpc-port",
                             str(_port()), "--metrics-export-port", str(_port()), "--runtime-env-agent-port",
                             str(_port()), "--ray-client-server-port", str(_port()), "--node-manager-port",
                             str(_port()), "--object-manager-port", str(_port())],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def stop_head() -> None:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        shutil.rmtree(ray_tmp, ignore_errors=True)

    url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while True:  # the job API is served by the dashboard, which comes up after `ray start` returns
        try:
            httpx.get(url + "/api/version", timeout=2)  # any answer (401 without the token) means up
            break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_head()
            pytest.fail(f"the Ray dashboard at {url} did not come up within 120 s")
        time.sleep(1)
    try:
        yield {"dashboard": url, "env": env, "tmp": tmp}
    finally:
        stop_head()


def _submit(head: dict, spec: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    for _ in range(30):  # the head's job agent registers a few seconds after the dashboard answers
        out = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", head["dashboard"], "--working-dir", str(ROOT), "--",
             "python", "-m", "orchestrator.deploy", str(spec)],
            cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=timeout,
        )
        if "No available agent to submit job" not in out.stderr + out.stdout:
            return out
        time.sleep(2)
    return out


def test_broken_spec_job_fails_with_field_message_and_starts_nothing(head) -> None:  # noqa: ANN001
    spec = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    spec["decode"]["max_batch"] = -1
    spec["router"]["polcy"] = "kv"
    bad = head["tmp"] / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    out = _submit(head, bad)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "decode.max_batch: Input should be greater than or equal to 1 (got -1)" in text
    assert "router.polcy: unknown field" in text
    listed = subprocess.run([str(BIN / "ray"), "list", "actors", "--address", head["dashboard"], "--format", "json"],
                            env=head["env"], capture_output=True, text=True, timeout=120)
    started = [a["class_name"] for a in json.loads(listed.stdout or "[]") if a["class_name"] != "JobSupervisor"]
    assert started == []  # no controller, router or worker was created


def test_submitted_deployment_serves_then_goes_down(head) -> None:  # noqa: ANN001
    token_file = head["tmp"] / "token"
    token_file.write_text("job-test-token\n")
    spec = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    spec["security"] = {"token_file": str(token_file), "admin_token_file": str(token_file)}
    path = head["tmp"] / "local.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = _submit(head, path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    status = next(json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"name"'))
    assert status["ready"] is True
    with open_channel(status["router_address"]) as ch:
        chunks = list(generate(ch, make_request(prompt="submitted as a job", max_tokens=4, ignore_eos=True),
                               token="job-test-token", timeout_s=120))
    assert sum(len(c.token_ids) for c in chunks) == 4
    assert chunks[-1].prefill_worker == "prefill-0/r0" and chunks[-1].decode_worker == "decode-0/r0"
    r = httpx.post(status["http_address"] + "/v1/down", headers={"authorization": "Bearer job-test-token"},
                   timeout=60)
    assert r.status_code == 200
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(status["http_address"] + "/healthz", timeout=2)
        except httpx.HTTPError:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the router still answers after down")
