"""The kernel entry points the model and the engine call; each dispatches through a registry.

Every function has the contract of its torch reference (named in OPS) and runs either that
reference or its Triton twin, as `registry` (default: default_registry(), configured from
TANDEM_KERNELS) decides for the device of its tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kernels import attention_ref, compressor_ref, indexer_ref, moe_ref, quant
from kernels.compressor_ref import PoolSpec
from kernels.entry_format import EntryFormat
from kernels.indexer_ref import KeyFormat
from kernels.registry import KernelConfig, KernelOp, KernelRegistry


def _op(name: str, reference: Callable[..., Any], module: str) -> KernelOp:
    """The op `name`: its torch reference, and its Triton twin `kernels.<module>.<name>`."""
    return KernelOp(name, reference, f"kernels.{module}", name)


class OPS:
    """The registered ops (a namespace of KernelOp objects, not strings)."""

    attend = _op("attend_with_sink", attention_ref.attend_with_sink, "attention_triton")
    sparse_decode = _op("sparse_decode_attention", attention_ref.sparse_decode_attention, "attention_triton")
    compress_pool = _op("compress_pool", compressor_ref.compress_pool, "compressor_triton")
    compress_pool_batched = _op(
        "compress_pool_batched", compressor_ref.compress_pool_batched, "compressor_triton"
    )
    index_scores = _op("index_scores", indexer_ref.index_scores, "indexer_triton")
    index_scores_paged = _op("index_scores_paged", indexer_ref.index_scores_paged, "indexer_triton")
    topk_indices = _op("topk_indices", indexer_ref.topk_indices, "indexer_triton")
    topk_mask = _op("topk_mask", indexer_ref.topk_mask, "indexer_triton")
    routed_experts = _op("routed_experts", moe_ref.routed_experts, "moe_triton")
    fp8_quantize = _op("fp8_e4m3_quantize", quant.fp8_e4m3_quantize, "quant_triton")
    fp8_dequantize = _op("fp8_e4m3_dequantize", quant.fp8_e4m3_dequantize, "quant_triton")
    fp4_quantize = _op("fp4_e2m1_quantize", quant.fp4_e2m1_quantize, "quant_triton")
    fp4_dequantize = _op("fp4_e2m1_dequantize", quant.fp4_e2m1_dequantize, "quant_triton")
    fp8_block_quantize = _op("fp8_block_quantize", quant.fp8_block_quantize, "quant_triton")
    fp8_block_dequantize = _op("fp8_block_dequantize", quant.fp8_block_dequantize, "quant_triton")

    @classmethod
    def all(cls) -> tuple[KernelOp, ...]:
        return tuple(v for v in vars(cls).values() if isinstance(v, KernelOp))


@functools.cache
def default_registry() -> KernelRegistry:
    """The process's registry, configured from TANDEM_KERNELS on first use."""
    return KernelRegistry(KernelConfig.from_env())


def reset_default_registry() -> None:
    """Forget the default registry so the next call re-reads TANDEM_KERNELS (tests, reconfiguration)."""
    default_registry.cache_clear()


def _reg(registry: KernelRegistry | None) -> KernelRegistry:
    return default_registry() if registry is None else registry


def attend(
    q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor, scale: float,
    registry: KernelRegistry | None = None,
) -> torch.Tensor:  # fmt: skip
    """Attention with sink, q [T, H, D], keys [S, D], mask [T, S] -> [T, H, D] (Attention._attend)."""
    return _reg(registry).run(OPS.attend, q, keys, mask, sink, scale)


def sparse_decode_attention(
    q: torch.Tensor, window_pool: torch.Tensor, window_table: torch.Tensor, seq_lens: torch.Tensor,
    window: int, entry_pool: torch.Tensor, entry_table: torch.Tensor, entry_idx: torch.Tensor,
    sink: torch.Tensor, scale: float, fmt: EntryFormat = EntryFormat(),
    registry: KernelRegistry | None = None,
) -> torch.Tensor:  # fmt: skip
    """Paged sparse decode attention over 584-byte entries (attention_ref.sparse_decode_attention)."""
    return _reg(registry).run(
        OPS.sparse_decode, q, window_pool, window_table, seq_lens, window, entry_pool, entry_table,
        entry_idx, sink, scale, fmt,
    )  # fmt: skip


def compress_pool(
    kv: torch.Tensor, score: torch.Tensor, spec: PoolSpec, registry: KernelRegistry | None = None
) -> torch.Tensor:
    """Compressor softmax pooling of raw rows (compressor_ref.compress_pool)."""
    return _reg(registry).run(OPS.compress_pool, kv, score, spec)


def compress_pool_batched(
    kv: torch.Tensor, score: torch.Tensor, first_block: torch.Tensor, n_done: torch.Tensor,
    n_total: torch.Tensor, ratio: int, head_dim: int, overlap: bool, registry: KernelRegistry | None = None,
) -> torch.Tensor:  # fmt: skip
    """Compressor pooling of a batch of sequences' rows, e.g. one decode step (compressor_ref)."""
    return _reg(registry).run(
        OPS.compress_pool_batched, kv, score, first_block, n_done, n_total, ratio, head_dim, overlap
    )


def index_scores(
    q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, registry: KernelRegistry | None = None
) -> torch.Tensor:
    """Indexer scores [T, n] (indexer_ref.index_scores)."""
    return _reg(registry).run(OPS.index_scores, q, w, keys)


def index_scores_paged(
    q: torch.Tensor, w: torch.Tensor, key_pool: torch.Tensor, key_table: torch.Tensor, n_keys: torch.Tensor,
    max_keys: int, fmt: KeyFormat, registry: KernelRegistry | None = None,
) -> torch.Tensor:  # fmt: skip
    """Decode indexer scores over paged FP4 / FP8 keys (indexer_ref.index_scores_paged)."""
    return _reg(registry).run(OPS.index_scores_paged, q, w, key_pool, key_table, n_keys, max_keys, fmt)


def topk_indices(
    scores: torch.Tensor, limits: torch.Tensor, k: int, registry: KernelRegistry | None = None
) -> torch.Tensor:
    """Top-k visible entry ids per row, ascending, -1 padded (indexer_ref.topk_indices)."""
    return _reg(registry).run(OPS.topk_indices, scores, limits, k)


def topk_mask(
    scores: torch.Tensor, limits: torch.Tensor, k: int, registry: KernelRegistry | None = None
) -> torch.Tensor:
    """Boolean mask of the top-k visible entries per row (indexer_ref.topk_mask)."""
    return _reg(registry).run(OPS.topk_mask, scores, limits, k)


def routed_experts(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
    w3: torch.Tensor, experts: Sequence[int], limit: float, act_group: int | None,
    registry: KernelRegistry | None = None,
) -> torch.Tensor:  # fmt: skip
    """Routed experts' weighted sum, float32 [N, hidden] (moe_ref.routed_experts)."""
    return _reg(registry).run(OPS.routed_experts, x, weights, ids, w1, w2, w3, experts, limit, act_group)


def fp8_e4m3_sim(x: torch.Tensor, group: int, registry: KernelRegistry | None = None) -> torch.Tensor:
    """FP8 e4m3 quantise-dequantise with UE8M0 group scales, in x's dtype (quant.fp8_e4m3_sim)."""
    reg = _reg(registry)
    q, e = reg.run(OPS.fp8_quantize, x, group)
    return reg.run(OPS.fp8_dequantize, q, e, group).to(x.dtype)


def fp4_e2m1_sim(x: torch.Tensor, group: int = 32, registry: KernelRegistry | None = None) -> torch.Tensor:
    """FP4 e2m1 quantise-dequantise with UE8M0 group scales, in x's dtype (quant.fp4_e2m1_sim)."""
    reg = _reg(registry)
    packed, e = reg.run(OPS.fp4_quantize, x, group)
    return reg.run(OPS.fp4_dequantize, packed, e, group).to(x.dtype)


def fp8_block_quantize(
    w: torch.Tensor, block: int = 128, registry: KernelRegistry | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 128x128 block quantisation (quant.fp8_block_quantize)."""
    return _reg(registry).run(OPS.fp8_block_quantize, w, block)


def fp8_block_dequantize(
    w: torch.Tensor, scale: torch.Tensor, block: int = 128, registry: KernelRegistry | None = None
) -> torch.Tensor:
    """FP8 128x128 block dequantisation (quant.fp8_block_dequantize)."""
    return _reg(registry).run(OPS.fp8_block_dequantize, w, scale, block)
