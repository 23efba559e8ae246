"""KV cache geometry derived from the model's layout (dsv4-model.md, "KV cache").

Pages are 256-token logical blocks (tandem.blocks.BLOCK_SIZE): per block a CSA layer holds 64
entries of 584 B and 64 indexer keys, an HCA layer 2 entries, V3.2's MLA layer 256 entries of
656 B plus 256 indexer keys of 132 B. On top, per request: every layer's sliding window (the last
128 raw tokens, 584 B each) and the compressors' unfinished state: CSA the fp32 kv and score rows
of its last <= 7 tokens (main and indexer compressors), HCA the unfinished block as running
softmax accumulators (3 x 512 fp32, however many tokens it has). These are the layouts the
engines keep and send (workers/kv/geometry.py); nothing here is fitted.
"""

from __future__ import annotations

import functools

from orchestrator.planner.models import AttentionGeometry, AttnKind, ModelArch
from tandem.blocks import BLOCK_SIZE


def _entries(a: AttentionGeometry, tokens: int) -> int:
    return tokens // a.ratio if a.ratio else 0


def block_bytes(arch: ModelArch, block_size: int = BLOCK_SIZE) -> int:
    """Bytes of the compressed pages of one full block of `block_size` tokens, all layers."""
    return sum(a.layers * _entries(a, block_size) * (a.entry_bytes + a.index_key_bytes)
               for a in arch.attention)


def bytes_per_token(arch: ModelArch) -> float:
    """Compressed KV bytes per token in steady state (window and state excluded)."""
    return block_bytes(arch) / BLOCK_SIZE


def _state_bytes(a: AttentionGeometry, tokens: int) -> int:
    """One layer's compressor state after `tokens` tokens (workers/model/compressor.py's rule)."""
    if a.kind is AttnKind.HCA:
        return a.state_pool_bytes if tokens % a.ratio else 0
    if not a.state_tokens_max:
        return 0
    # overlapping (CSA): the rows from the block before the last finished entry
    rows = tokens - max(tokens // a.ratio - 1, 0) * a.ratio
    return rows * a.state_bytes_per_token


def _state_bytes_max(a: AttentionGeometry) -> int:
    return a.state_tokens_max * a.state_bytes_per_token + a.state_pool_bytes


def window_and_state_bytes(arch: ModelArch, tokens: int) -> int:
    """Per-request bytes outside the pages: the windows and the compressor states at `tokens`."""
    return sum(a.layers * (min(tokens, a.window) * a.entry_bytes + _state_bytes(a, tokens))
               for a in arch.attention)


def _entry_bytes(arch: ModelArch, tokens: int) -> int:
    """Compressed entries and indexer keys of `tokens` tokens, all layers."""
    return sum(a.layers * _entries(a, tokens) * (a.entry_bytes + a.index_key_bytes) for a in arch.attention)


def request_bytes(arch: ModelArch, tokens: int) -> int:
    """Everything one request of `tokens` tokens holds: compressed entries, keys, windows, states."""
    return _entry_bytes(arch, tokens) + window_and_state_bytes(arch, tokens)


def state_page_bytes(arch: ModelArch) -> int:
    """The largest compressor state of one request, all layers: the workers' STATE page (without
    speculation's MTP row)."""
    return sum(a.layers * _state_bytes_max(a) for a in arch.attention)


def request_reserve_bytes(arch: ModelArch, tokens: int) -> int:
    """What an allocator reserves for a request that may grow to `tokens`: whole pages, full
    windows, the largest compressor states."""
    blocks = -(-tokens // BLOCK_SIZE)
    fixed = sum(a.layers * (a.window * a.entry_bytes + _state_bytes_max(a)) for a in arch.attention)
    return blocks * block_bytes(arch) + fixed


def handoff_bytes(arch: ModelArch, prompt_tokens: int, reused_blocks: int = 0) -> int:
    """Bytes a decode worker pulls after a remote prefill of `prompt_tokens` tokens.

    The compressed entries and indexer keys of the blocks it does not hold yet, plus every layer's
    window and compressor state (never shared), plus the MTP layer's window (V4) and the last
    hidden state (BF16) for it.
    """
    if not 0 <= reused_blocks <= prompt_tokens // BLOCK_SIZE:
        raise ValueError(f"reused_blocks = {reused_blocks}: must be in "
                         f"[0, {prompt_tokens // BLOCK_SIZE}] for a prompt of {prompt_tokens} tokens")
    sent = _entry_bytes(arch, prompt_tokens) - reused_blocks * block_bytes(arch)
    mtp = 0
    if any(a.window for a in arch.attention):
        mtp = min(prompt_tokens, arch.attention[0].window) * arch.attention[0].entry_bytes + arch.hidden * 2
    return sent + window_and_state_bytes(arch, prompt_tokens) + mtp


@functools.cache
def handoff_memo(arch: ModelArch) -> dict[int, int]:
    """prompt tokens -> `handoff_bytes(arch, prompt)` with nothing reused, filled by the callers as
    lengths come (one table per model, shared by every replay of a goodput search or a plan)."""
    return {}


def handoff_base(arch: ModelArch, memo: dict[int, int], prompt_tokens: int) -> int:
    """`handoff_bytes(arch, prompt_tokens)` through `memo` (= handoff_memo(arch))."""
    if (hit := memo.get(prompt_tokens)) is None:
        hit = memo[prompt_tokens] = handoff_bytes(arch, prompt_tokens)
    return hit
