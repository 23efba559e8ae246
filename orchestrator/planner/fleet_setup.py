"""What both simulators set up the same way from a fleet: where each instance sits (NVLink
domains), each pool's KV capacity and reported prefill rate, and the check that every request fits."""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.planner.fleet import FleetConfig, PoolConfig
from orchestrator.planner.kv_layout import request_reserve_bytes
from orchestrator.planner.models import ModelArch
from orchestrator.planner.trace import TraceRequest
from tandem.blocks import BLOCK_SIZE


def placement(fleet: FleetConfig) -> tuple[list[str], list[str]]:
    """NVLink domain of each prefill and each decode instance."""
    order = sorted([((i + 0.5) / fleet.prefill.instances, 0, i) for i in range(fleet.prefill.instances)]
                   + [((i + 0.5) / fleet.decode.instances, 1, i) for i in range(fleet.decode.instances)])
    domains: tuple[list[str], list[str]] = ([""] * fleet.prefill.instances, [""] * fleet.decode.instances)
    dom, used = 0, 0
    for _, role, i in order:
        size = (fleet.prefill if role == 0 else fleet.decode).par.gpus
        if used + size > fleet.domain_gpus:
            dom, used = dom + 1, 0
        domains[role][i] = f"domain{dom}"
        used += size
    return domains


def pool_capacity(fleet: FleetConfig, pool: PoolConfig, block_bytes_: int) -> int:
    """KV blocks of one instance of `pool`: the spec's, or what HBM leaves after the weights."""
    if pool.kv_blocks is not None:
        return pool.kv_blocks
    return int(fleet.cost_model(pool).kv_pool_bytes() // block_bytes_)


def pool_rate(fleet: FleetConfig, pool: PoolConfig) -> float:
    """The prefill rate a worker reports: one full chunk from an empty context, per the cost model."""
    chunk = pool.max_batched_tokens
    return chunk / fleet.cost_model(pool).prefill_chunk_seconds(((0, chunk),), 1)


def check_fits(requests: Sequence[TraceRequest], arch: ModelArch, block_bytes_: int, *, decode_capacity: int,
               prefill_capacity: int | None) -> None:
    """Every request must fit one worker of each role it may use, or the replay would stall
    (prefill_capacity None: no prefill pool)."""
    if not requests:
        raise ValueError("no requests to simulate")

    def blocks(tokens: int) -> int:
        return -(-request_reserve_bytes(arch, tokens) // block_bytes_)

    big = max(requests, key=lambda r: r.prompt_tokens + r.output_tokens)
    where = f"request {big.request_id!r} ({big.prompt_tokens} prompt + {big.output_tokens} output tokens)"
    need = blocks(big.prompt_tokens + big.output_tokens)
    if need > decode_capacity:
        raise ValueError(f"{where} needs {need} KV blocks; a decode instance holds {decode_capacity}")
    big = max(requests, key=lambda r: r.prompt_tokens)
    need = blocks(big.prompt_tokens)
    if prefill_capacity is not None and need > prefill_capacity:
        raise ValueError(f"request {big.request_id!r} ({big.prompt_tokens} prompt tokens) needs {need} "
                         f"KV blocks to prefill; a prefill instance holds {prefill_capacity}")


def answer_blocks(requests: Sequence[TraceRequest]) -> list[tuple[int, ...]]:
    """Per request (same order): the hashes of the full blocks its answer fills on the decode, where a
    later turn of its session reveals them; () where none does.

    A decode computes the blocks its answer fills (prompt + output - 1 tokens are in its KV at the
    end) and keeps them resumable; a session's next turn whose prompt extends this one (prompt,
    answer, new message) names those blocks' hashes. Answers nobody continues are not modelled (a
    trace carries no hashes for them), so the decodes' caches hold a little less than the workers'
    would."""
    last: dict[str, int] = {}  # session -> its latest turn so far (index into requests)
    out: list[tuple[int, ...]] = [()] * len(requests)
    for j, r in enumerate(requests):
        if r.session_id is None:
            continue
        i = last.get(r.session_id)
        last[r.session_id] = j
        if i is None:
            continue
        prev = requests[i]
        n = len(prev.block_hashes)
        if r.block_hashes[:n] == prev.block_hashes:
            filled = (prev.prompt_tokens + prev.output_tokens - 1) // BLOCK_SIZE  # full blocks in its KV
            out[i] = r.block_hashes[n:min(filled, len(r.block_hashes))]
    return out
