"""Named model configurations: the real V4-Flash and V4-Pro sizes, and a tiny one for CPU tests.

The real presets are for shape checks (meta tensors) and planning; tests never allocate them.
`tiny` keeps the real KV geometry (head_dim 512, rope 64, indexer 16 x 128, window 128, ratios
4 and 128) so the 584-byte entry layout is what pools, kernels and transfers carry, with a small
hidden size and few experts so a 300-token forward takes well under a second on two cores.
"""

from __future__ import annotations

from collections.abc import Callable

from workers.model.config import LayerKind, ModelConfig

SWA, CSA, HCA = LayerKind.SWA, LayerKind.CSA, LayerKind.HCA


def v4_flash() -> ModelConfig:
    """DeepSeek-V4-Flash: 43 layers (SWA 0-1, CSA even 2..42, HCA odd 3..41), 284B total."""
    return ModelConfig(
        vocab_size=129280,
        hidden_size=4096,
        layer_kinds=(SWA, SWA) + (CSA, HCA) * 20 + (CSA,),
        hash_layers=3,
        num_heads=64,
        q_lora_rank=1024,
        o_groups=8,
        o_lora_rank=1024,
        n_routed_experts=256,
        top_k=6,
        moe_intermediate_size=2048,
        routed_scaling_factor=1.5,
        index_topk=512,
    )


def v4_pro() -> ModelConfig:
    """DeepSeek-V4-Pro: 61 layers (HCA 0, 1 and odd 3..59, CSA even 2..60), 1.6T total."""
    return ModelConfig(
        vocab_size=129280,
        hidden_size=7168,
        layer_kinds=(HCA, HCA) + (CSA, HCA) * 29 + (CSA,),
        hash_layers=3,
        num_heads=128,
        q_lora_rank=1536,
        o_groups=16,
        o_lora_rank=1024,
        n_routed_experts=384,
        top_k=6,
        moe_intermediate_size=3072,
        routed_scaling_factor=2.5,
        index_topk=1024,
    )


def tiny() -> ModelConfig:
    """Three layers (SWA, CSA, HCA), one hash-routed, 4 experts top-2, hidden 128, real KV geometry.

    Dimensions feeding FP8-simulated GEMMs (hidden, q_lora, o_groups * o_lora, expert
    intermediate) are multiples of 128, the activation quantisation group.
    """
    return ModelConfig(
        vocab_size=1024,
        hidden_size=128,
        layer_kinds=(SWA, CSA, HCA),
        hash_layers=1,
        num_heads=4,
        q_lora_rank=128,
        o_groups=2,
        o_lora_rank=64,
        n_routed_experts=4,
        top_k=2,
        moe_intermediate_size=128,
        routed_scaling_factor=1.5,
        index_heads=16,
        index_topk=8,
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {"v4-flash": v4_flash, "v4-pro": v4_pro, "tiny": tiny}


def preset(name: str) -> ModelConfig:
    """The named preset; raises KeyError listing the known names."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()
