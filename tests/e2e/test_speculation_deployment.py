"""deploy/local.yaml with MTP speculation on (decode.speculation.mtp_tokens 2): every request is
disaggregated (prefill-0 -> NIXL -> decode-0) and speculated from its first decode step. Checked
against the demo model run straight (greedy): the same tokens, with drafts proposed and accepted
in the final chunk's speculation counts and in the router's counters."""

from __future__ import annotations

import urllib.request

import pytest
import torch
import yaml
from support.deployments import module_deployment

from orchestrator.router.client import generate, make_request, open_channel
from orchestrator.spec import load_spec, parse_spec
from orchestrator.worker_plan import model_source
from tandem.tokenizer import ByteTokenizer
from tandem.v1 import generate_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPEC = "deploy/local.yaml"


@pytest.fixture(scope="module")
def deployment(ray_session):  # noqa: ANN001, ANN201
    with open(SPEC) as f:
        data = yaml.safe_load(f)
    data["name"] = "local-spec"
    data["decode"]["speculation"] = {"mtp_tokens": 2}
    yield from module_deployment(ray_session, parse_spec(data, SPEC))


def _stream(dep: dict, **kw) -> list[generate_pb2.GenerateChunk]:  # noqa: ANN003
    with open_channel(dep["status"]["router_address"]) as ch:
        return list(generate(ch, make_request(**kw), token=dep["token"], timeout_s=120))


def test_speculated_disaggregated_tokens_equal_the_model_run_straight(deployment) -> None:  # noqa: ANN001
    reference = model_source(load_spec(SPEC)).build(None)
    tok = ByteTokenizer()
    drafted = accepted = 0
    for prompt in (tok.encode("The router picks"), tok.encode("Compressed KV blocks move"),
                   torch.randint(0, 256, (130,), generator=torch.Generator().manual_seed(1)).tolist()):
        chunks = _stream(deployment, token_ids=prompt, max_tokens=20, ignore_eos=True)
        got = [t for c in chunks for t in c.token_ids]
        with torch.no_grad():
            assert got == reference.generate(torch.tensor(prompt), 20)
        last = chunks[-1]
        assert (last.prefill_worker, last.decode_worker) == ("prefill-0/r0", "decode-0/r0")
        assert last.speculation.drafted_tokens > 0
        drafted += last.speculation.drafted_tokens
        accepted += last.speculation.accepted_tokens
    assert accepted > 0
    with urllib.request.urlopen(deployment["status"]["http_address"] + "/metrics", timeout=30) as r:
        text = r.read().decode()
    assert f"tandem_router_spec_drafted_tokens_total {float(drafted)}" in text
    assert f"tandem_router_spec_accepted_tokens_total {float(accepted)}" in text
