"""The wire contract: committed codegen is fresh, Generate has the fields clients rely on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tandem.v1 import generate_pb2, generate_pb2_grpc, worker_pb2

pytestmark = pytest.mark.foundation

ROOT = Path(__file__).resolve().parents[2]
V1 = ROOT / "proto" / "tandem" / "v1"


def test_committed_codegen_is_not_stale(tmp_path: Path) -> None:
    protos = sorted(V1.glob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *map(str, protos)],
        check=True,
    )
    fresh = sorted(p for p in (tmp_path / "tandem" / "v1").iterdir())
    assert [p.name for p in fresh] == sorted(p.name for p in V1.iterdir() if "_pb2" in p.name)
    stale = [p.name for p in fresh if p.read_bytes() != (V1 / p.name).read_bytes()]
    assert not stale, f"run `make proto`: stale generated files {stale}"


def _fields(msg: type) -> set[str]:
    return {f.name for f in msg.DESCRIPTOR.fields}


def test_generate_request_and_chunk_fields() -> None:
    assert _fields(generate_pb2.GenerateRequest) == {
        "request_id", "prompt", "token_ids", "sampling", "deadline_ms", "session_id", "cache_salt", "messages",
        "chat"}
    assert _fields(generate_pb2.SamplingParams) == {
        "temperature", "top_p", "top_k", "seed", "max_tokens", "stop", "stop_token_ids", "ignore_eos", "logprobs",
        "top_logprobs"}
    assert {"token_ids", "text", "finish_reason", "usage", "timing", "prefill_worker", "decode_worker",
            "kv_transfer_bytes"} <= _fields(generate_pb2.GenerateChunk)
    assert {"ttft_s", "queue_s", "transfer_s"} <= _fields(generate_pb2.Timing)


def test_router_service_streams_generate() -> None:
    svc = generate_pb2.DESCRIPTOR.services_by_name["Router"]
    assert svc.full_name == "tandem.v1.Router"
    method = svc.methods_by_name["Generate"]
    assert method.server_streaming and not method.client_streaming
    assert hasattr(generate_pb2_grpc, "RouterServicer") and hasattr(generate_pb2_grpc, "RouterStub")


def test_internal_wire_types_round_trip() -> None:
    worker = worker_pb2.WorkerId(instance="prefill-0", dp_rank=1)
    batch = worker_pb2.KvEventBatch(worker=worker, events=[
        worker_pb2.KvEvent(seq=1, stored=worker_pb2.KvStored(block_hashes=[2**64 - 1, 5])),
        worker_pb2.KvEvent(seq=2, removed=worker_pb2.KvRemoved(block_hashes=[5])),
        worker_pb2.KvEvent(seq=3, cleared=worker_pb2.KvCleared()),
    ])
    back = worker_pb2.KvEventBatch.FromString(batch.SerializeToString())
    assert [e.WhichOneof("kind") for e in back.events] == ["stored", "removed", "cleared"]
    assert list(back.events[0].stored.block_hashes) == [2**64 - 1, 5]
    assert not back.events[0].stored.HasField("parent_hash")
    desc = worker_pb2.HandoffDescriptor(
        request_id="r", prefill=worker, epoch=3, first_token=7, layout_hash=2**63,
        pools=[worker_pb2.PoolBlocks(kind=worker_pb2.POOL_KIND_BLOCK, block_ids=[4, 5])])
    assert worker_pb2.HandoffDescriptor.FromString(desc.SerializeToString()) == desc
