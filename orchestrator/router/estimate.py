"""The shared arithmetic of routing: uncached tokens, prefill time, KV transfer time.

Every policy reports its choice's expected TTFT and handoff time with these same formulas, so the
planner's simulator compares policies on one yardstick.
"""

from __future__ import annotations

from orchestrator.router.inputs import FleetParams, WorkerState


def prompt_blocks(prompt_tokens: int, block_size: int) -> int:
    """KV blocks a prompt occupies, the partial last block included."""
    return -(-prompt_tokens // block_size)


def uncached_tokens(prompt_tokens: int, cached_blocks: int, block_size: int) -> int:
    """Prompt tokens a worker holding `cached_blocks` leading blocks must compute.

    At least 1: the last prompt token is always computed, because it yields the first token's logits.
    """
    return max(prompt_tokens - cached_blocks * block_size, 1)


def prefill_seconds(worker: WorkerState, tokens: int) -> float:
    """Time until `tokens` more prompt tokens are done on worker: its queued work goes first."""
    return (worker.queued_prefill_tokens + tokens) / worker.prefill_rate_tps


def transfer_blocks(prompt_tokens: int, decode_cached_blocks: int, block_size: int) -> int:
    """Blocks the decode must receive: the prompt's blocks minus those it already holds."""
    return max(prompt_blocks(prompt_tokens, block_size) - decode_cached_blocks, 0)


def handoff_seconds(fleet: FleetParams, prefill: WorkerState, decode: WorkerState, blocks: int) -> float:
    """Time to move `blocks` KV blocks from prefill to decode over the link between them."""
    return fleet.topology.link(prefill, decode).seconds(blocks * fleet.kv_bytes_per_block)
