"""One local deployment (deploy/local.yaml on this CPU) driven through every door: gRPC, the
OpenAI client over HTTP, a reflection-only gRPC client, the CLI; scaled and drained under load.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import grpc
import httpx
import pytest
import torch
from support.deployments import module_deployment
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.deploy import controller_for
from orchestrator.router.client import generate, make_request, open_channel
from orchestrator.spec import load_spec
from orchestrator.worker_plan import model_source
from tandem.tokenizer import ByteTokenizer
from tandem.v1 import generate_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPEC = "deploy/local.yaml"


@pytest.fixture(scope="module")
def deployment(ray_session):  # noqa: ANN001, ANN201
    yield from module_deployment(ray_session, load_spec(SPEC))


@pytest.fixture(scope="module")
def reference_model():  # noqa: ANN201
    """The same weights the workers build (the preset's seeded random init), run straight."""
    return model_source(load_spec(SPEC)).build(None)


def _stream(dep: dict, **kw) -> list[generate_pb2.GenerateChunk]:  # noqa: ANN003
    with open_channel(dep["status"]["router_address"]) as ch:
        return list(generate(ch, make_request(**kw), token=dep["token"], timeout_s=120))


def test_deployment_is_ready(deployment) -> None:  # noqa: ANN001
    st = deployment["status"]
    assert st["ready"] and [i["id"] for i in st["instances"]] == ["prefill-0", "decode-0"]
    # and the router says so to probes: gRPC health of the router service, HTTP /readyz (no token)
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(st["router_address"]) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="tandem.v1.Router"),
                                                      timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    ready = httpx.get(st["http_address"] + "/readyz", timeout=10)
    assert (ready.status_code, ready.json()) == (200, {"ready": True})


@pytest.mark.parametrize("length", [1, 130, 300])
def test_disaggregated_greedy_tokens_equal_the_model_run_straight(deployment, reference_model, length: int) -> None:  # noqa: ANN001
    prompt = torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    chunks = _stream(deployment, token_ids=prompt, max_tokens=6, ignore_eos=True)
    got = [t for c in chunks for t in c.token_ids]
    with torch.no_grad():
        want = reference_model.generate(torch.tensor(prompt), 6)
    assert got == want[: len(got)] and len(got) == 6
    last = chunks[-1]
    assert last.finish_reason == generate_pb2.FINISH_REASON_LENGTH
    assert (last.prefill_worker, last.decode_worker) == ("prefill-0/r0", "decode-0/r0")
    assert last.usage.prompt_tokens == length and last.usage.completion_tokens == 6
    assert last.timing.ttft_s > 0 and last.timing.total_s >= last.timing.ttft_s


def test_openai_client_completions_and_chat(deployment) -> None:  # noqa: ANN001
    import openai

    client = openai.OpenAI(base_url=deployment["status"]["http_address"] + "/v1", api_key=deployment["token"])
    done = client.completions.create(model="local", prompt="Tandem", max_tokens=4, temperature=0)
    assert done.usage.completion_tokens == 4 and done.choices[0].finish_reason in ("length", "stop")
    pieces = [c.choices[0].text for c in client.completions.create(model="local", prompt="Tandem", max_tokens=4,
                                                                    temperature=0, stream=True)]
    assert "".join(pieces) == done.choices[0].text
    chat = client.chat.completions.create(model="local", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 3
    streamed = list(client.chat.completions.create(model="local", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=3, stream=True))
    assert streamed[-1].choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=deployment["status"]["http_address"] + "/v1", api_key="wrong").models.list()


def test_logprobs_over_grpc_and_http_equal_the_model_run_straight(deployment, reference_model) -> None:  # noqa: ANN001
    import openai

    prompt = ByteTokenizer().encode("Tandem serves DeepSeek-V4 with disaggregated prefill and decode. " * 2)
    chunks = _stream(deployment, token_ids=prompt, max_tokens=5, ignore_eos=True, logprobs=3)
    toks = [t for c in chunks for t in c.token_ids]
    lps = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in lps] == toks and len(toks) == 5 and chunks[-1].decode_worker == "decode-0/r0"
    with torch.no_grad():  # one forward pass over prompt + tokens: every generated position's logits
        logits = reference_model.prefill(0, torch.tensor(prompt + toks[:-1]), reference_model.new_cache())
    ref = torch.log_softmax(logits[len(prompt) - 1:].double(), dim=1)
    for pos, lp in enumerate(lps):  # the first from the prefill worker, the rest from the decode
        assert lp.logprob == pytest.approx(float(ref[pos].max()), abs=1e-3)  # greedy: the top-1
        assert [t.token_id for t in lp.top][0] == lp.token_id == int(ref[pos].argmax())
        assert [t.logprob for t in lp.top] == pytest.approx(torch.topk(ref[pos], 3).values.tolist(), abs=1e-3)
    client = openai.OpenAI(base_url=deployment["status"]["http_address"] + "/v1", api_key=deployment["token"])
    # The same request over HTTP (the text re-encodes to the same ids): the same logprobs.
    comp = client.completions.create(model="local", prompt=ByteTokenizer().decode(prompt), max_tokens=5,
                                     temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    assert comp.choices[0].logprobs.token_logprobs == pytest.approx([lp.logprob for lp in lps], abs=1e-3)
    chat = list(client.chat.completions.create(model="local", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3, logprobs=True, top_logprobs=2, stream=True,
                                               extra_body={"ignore_eos": True}))
    entries = [e for c in chat if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 3 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)


def test_generic_client_finds_generate_by_reflection(deployment) -> None:  # noqa: ANN001
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(deployment["status"]["router_address"]) as ch:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
        method = pool.FindServiceByName("tandem.v1.Router").methods_by_name["Generate"]
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        call = ch.unary_stream("/tandem.v1.Router/Generate", request_serializer=req_cls.SerializeToString,
                               response_deserializer=resp_cls.FromString)
        req = req_cls(prompt="reflection", sampling={"max_tokens": 3, "ignore_eos": True})
        chunks = list(call(req, metadata=(("authorization", f"Bearer {deployment['token']}"),), timeout=60))
    assert sum(len(c.token_ids) for c in chunks) == 3 and chunks[-1].decode_worker == "decode-0/r0"


def test_cli_status_and_generate(deployment, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("TANDEM_STATE", "/nonexistent/state.json")
    monkeypatch.setenv("TANDEM_HTTP_ADDRESS", deployment["status"]["http_address"])
    monkeypatch.setenv("TANDEM_ADMIN_TOKEN", deployment["admin_token"])
    monkeypatch.setenv("TANDEM_ADDRESS", deployment["status"]["router_address"])
    monkeypatch.setenv("TANDEM_TOKEN", deployment["token"])
    runner = CliRunner()
    st = runner.invoke(app, ["status", "--json"])
    assert st.exit_code == 0, st.output
    assert json.loads(st.output)["ready"] is True
    gen = runner.invoke(app, ["generate", "--token-ids", "1,2,3", "--max-tokens", "3", "--ignore-eos", "--json"])
    assert gen.exit_code == 0, gen.output
    lines = [json.loads(x) for x in gen.output.splitlines()]
    assert sum(len(x["token_ids"]) for x in lines) == 3
    assert lines[-1]["prefill_worker"] == "prefill-0/r0" and "timing" in lines[-1]
    bad = runner.invoke(app, ["status"], env={"TANDEM_ADMIN_TOKEN": "wrong"})
    assert bad.exit_code == 1 and "HTTP 401" in bad.output


def test_scale_up_and_down_under_load_loses_nothing(deployment, ray_session) -> None:  # noqa: ANN001
    ctl = deployment["ctl"]
    tok = ByteTokenizer()

    def one(i: int) -> int:
        chunks = _stream(deployment, token_ids=tok.encode(f"request {i} " * (1 + i % 5)), max_tokens=5,
                         ignore_eos=True)
        return sum(len(c.token_ids) for c in chunks)

    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(16)]
        up = ray_session.get(ctl.scale.remote(None, 2))
        futures += [pool.submit(one, i) for i in range(16, 24)]
        down = ray_session.get(ctl.scale.remote(None, 1, 30.0))
        futures += [pool.submit(one, i) for i in range(24, 28)]
        produced = [f.result(timeout=180) for f in futures]
    assert produced == [5] * 28
    assert [i["id"] for i in up["instances"] if i["role"] == "decode"] == ["decode-0", "decode-1"]
    assert [i["id"] for i in down["instances"] if i["role"] == "decode"] == ["decode-0"]
    used = []
    for _ in range(30):
        after = ray_session.get(ctl.status.remote())
        used = [(i["id"], i["kv_blocks_used"]) for i in after["instances"]]
        if used == [("prefill-0", 0), ("decode-0", 0)]:
            break
        time.sleep(0.5)
    assert used == [("prefill-0", 0), ("decode-0", 0)]


def test_drain_removes_the_instance(deployment, ray_session) -> None:  # noqa: ANN001
    ctl = deployment["ctl"]
    ray_session.get(ctl.scale.remote(1, 2))
    st = ray_session.get(ctl.drain.remote("decode-2", 10.0))
    assert [i["id"] for i in st["instances"]] == ["prefill-0", "decode-0"]
    assert len(_stream(deployment, prompt="after drain", max_tokens=2, ignore_eos=True)) >= 1


def test_router_metrics_show_requests_hits_and_worker_queues(deployment) -> None:  # noqa: ANN001

    text = httpx.get(deployment["status"]["http_address"] + "/metrics", timeout=30).text
    assert 'tandem_router_requests_total{code="OK"}' in text
    assert 'tandem_router_worker_queue_depth{worker="decode-0/0"}' in text
    assert "tandem_router_kv_transfer_bytes_total" in text and "tandem_router_ttft_seconds_count" in text


def test_a_second_router_serves_the_same_workers_and_sees_the_same_events(deployment, ray_session) -> None:  # noqa: ANN001
    replica = ray_session.get(deployment["ctl"].add_router.remote())
    assert replica["router_address"] != deployment["status"]["router_address"]
    prompt = ByteTokenizer().encode("replicas follow the same KV events " * 10)  # > 256 tokens: one full block
    for address in (deployment["status"]["router_address"], replica["router_address"]):
        with open_channel(address) as ch:
            chunks = list(generate(ch, make_request(token_ids=prompt, max_tokens=3, ignore_eos=True),
                                   token=deployment["token"], timeout_s=120))
        assert sum(len(c.token_ids) for c in chunks) == 3
        time.sleep(1.0)  # workers report KV events every 0.25 s
    # The replica's own index knew, from the prefill's KV events, that the prefill held the prompt's
    # block (its routing counted it as a cached block), and the prefill indeed served it from cache.
    assert chunks[-1].usage.cached_tokens == 256

    metrics = httpx.get(replica["http_address"] + "/metrics", timeout=30).text
    assert "tandem_router_cached_blocks_total 1.0" in metrics


def test_a_restarted_controller_adopts_the_running_deployment(deployment, ray_session) -> None:  # noqa: ANN001
    before = ray_session.get(deployment["ctl"].status.remote())
    ray_session.kill(deployment["ctl"], no_restart=True)
    ctl, status = controller_for(load_spec(SPEC), placement_timeout_s=60)
    deployment["ctl"] = ctl  # the module's teardown takes down what the new controller runs
    assert [i["id"] for i in status["instances"]] == [i["id"] for i in before["instances"]]
    assert status["ready"] and status["router_address"] == before["router_address"]
    assert sum(len(c.token_ids) for c in _stream(deployment, prompt="adopted", max_tokens=3, ignore_eos=True)) == 3

    r = httpx.get(status["http_address"] + "/v1/status", headers={"authorization": f"Bearer {deployment['admin_token']}"},
                  timeout=30)
    assert r.status_code == 200 and r.json()["ready"] is True  # the admin routes reach the new controller
