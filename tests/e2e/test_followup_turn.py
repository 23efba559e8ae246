"""A follow-up turn is prefilled on the decode that served the previous turn (conditional
disaggregation), resuming after the answer's KV it computed there.

One local deployment: deploy/local.yaml with disaggregation `conditional` and local prefill only
under 256 uncached tokens. Turn 1 (600 tokens, nothing cached) goes through prefill-0; decode-0
pulls it and decodes 300 tokens. Its prompt blocks are held only there (pulled), but block 2
(positions 512..767, part prompt, part answer) it computed, with a boundary at 768: resumable.
Turn 2 = turn 1's prompt + its answer + 50 new tokens (950 tokens, same session): only 182 are
uncached on decode-0, so it prefills locally there and reports 768 cached tokens and no transfer.
"""

from __future__ import annotations

import time

import pytest
import torch
from support.deployments import module_deployment

from orchestrator.controller import NAMESPACE
from orchestrator.router.client import generate, make_request, open_channel
from orchestrator.spec import load_spec, parse_spec

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT, ANSWER, NEW, REPLY = 600, 300, 50, 4


@pytest.fixture(scope="module")
def deployment(ray_session):  # noqa: ANN001, ANN201
    data = load_spec("deploy/local.yaml").model_dump(mode="json")
    data["name"] = "followup"
    data["router"]["disaggregation"].update(mode="conditional", max_local_prefill_tokens=256)
    yield from module_deployment(ray_session, parse_spec(data, "followup"))


def _turn(dep: dict, token_ids: list[int], max_tokens: int) -> list:
    with open_channel(dep["status"]["router_address"]) as ch:
        req = make_request(token_ids=token_ids, max_tokens=max_tokens, ignore_eos=True, session_id="chat-1")
        return list(generate(ch, req, token=dep["token"], timeout_s=120))


def test_a_follow_up_turn_prefills_locally_after_the_answer_it_decoded(deployment, ray_session) -> None:  # noqa: ANN001
    prompt = torch.randint(0, 256, (PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()
    first = _turn(deployment, prompt, ANSWER)
    answer = [t for c in first for t in c.token_ids]
    last = first[-1]
    assert len(answer) == ANSWER and last.usage.cached_tokens == 0
    assert (last.prefill_worker, last.decode_worker) == ("prefill-0/r0", "decode-0/r0")
    assert last.kv_transfer_bytes > 0  # the prompt's pages were pulled

    # The decode's KV events reach the router (reports every 0.25 s): one resumable block, block 2.
    router = ray_session.get_actor("tandem-router", namespace=NAMESPACE)
    end = time.monotonic() + 10
    while len(ray_session.get(router.kv_holdings.remote("decode-0", 0))) != 1:
        assert time.monotonic() < end, "the router never indexed the decode's computed block"
        time.sleep(0.1)

    new = torch.randint(0, 256, (NEW,), generator=torch.Generator().manual_seed(6)).tolist()
    second = _turn(deployment, prompt + answer + new, REPLY)
    last = second[-1]
    assert sum(len(c.token_ids) for c in second) == REPLY
    assert (last.prefill_worker, last.decode_worker) == ("decode-0/r0", "decode-0/r0")  # local prefill
    assert last.usage.prompt_tokens == PROMPT + ANSWER + NEW == 950
    assert last.usage.cached_tokens == 3 * 256  # resumed after block 2; only 182 tokens computed
    assert last.kv_transfer_bytes == 0
