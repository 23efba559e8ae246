"""A tiny transformers DeepseekV4ForCausalLM with every parameter randomised (test helper)."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.model.config import ModelConfig


def hf_config(cfg: ModelConfig):  # -> transformers.DeepseekV4Config
    from transformers import DeepseekV4Config

    yarn = cfg.yarn
    rope = {"rope_type": "default"}
    if yarn is not None:
        rope = {"rope_type": "yarn", "factor": yarn.factor, "original_max_position_embeddings":
                yarn.original_max_position, "beta_fast": yarn.beta_fast, "beta_slow": yarn.beta_slow}
    return DeepseekV4Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, head_dim=cfg.head_dim,
        q_lora_rank=cfg.q_lora_rank, num_experts_per_tok=cfg.top_k, n_routed_experts=cfg.n_routed_experts,
        routed_scaling_factor=cfg.routed_scaling_factor, o_groups=cfg.o_groups, o_lora_rank=cfg.o_lora_rank,
        index_n_heads=cfg.index_heads, index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk,
        hc_mult=cfg.hc_mult, hc_sinkhorn_iters=cfg.hc_sinkhorn_iters, sliding_window=cfg.window,
        layer_types=[k.value for k in cfg.layer_kinds],
        mlp_layer_types=["hash_moe" if cfg.is_hash_layer(i) else "moe" for i in range(cfg.num_layers)],
        partial_rotary_factor=cfg.rope_head_dim / cfg.head_dim, rope_theta=cfg.rope_theta,
        compress_rope_theta=cfg.compress_rope_theta, rope_parameters=rope, num_nextn_predict_layers=0,
    )


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (transformers zero-initialises sinks, biases, ape, mHC base)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() == 1 and leaf == "weight":
            v = 1 + 0.1 * torch.randn(p.shape, generator=g)
        elif "embed_tokens" in name:
            v = torch.randn(p.shape, generator=g)
        elif p.dim() in (2, 3):  # linears [out, in] and stacked experts [E, out, in]
            v = torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5
        elif leaf in ("scale", "hc_scale"):
            v = 0.5 + torch.rand(p.shape, generator=g)
        else:  # sinks, base, position_bias
            v = 0.5 * torch.randn(p.shape, generator=g)
        p.copy_(v)
    for name, b in model.named_buffers():
        if name.endswith("tid2eid"):
            e, k = model.config.n_routed_experts, model.config.num_experts_per_tok
            b.copy_(torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(b.shape[0])]))
        elif name.endswith("e_score_correction_bias"):
            b.copy_(0.5 * torch.randn(b.shape, generator=g))


def save_hf_tiny(cfg: ModelConfig, path: Path, seed: int = 0):
    """Build, randomise and `save_pretrained` a transformers model of `cfg`; returns the model."""
    from transformers import DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM(hf_config(cfg)).eval()
    randomise(model, seed)
    model.save_pretrained(path)
    return model
