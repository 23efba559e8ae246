"""Deterministic random weights for tests, benchmarks and the demo (no checkpoint needed).

Scales keep activations O(1) through the tiny model: linear weights ~ N(0, 1/in), norm weights
near 1, and every bias-like parameter (ape, sinks, gate bias, mHC base / scale) non-zero so that
each code path matters. `tid2eid` rows are distinct experts per token.
"""

from __future__ import annotations

import torch

from workers.model.model import DeepseekV4


@torch.no_grad()
def init_random(model: DeepseekV4, seed: int = 0) -> DeepseekV4:
    """Fill every parameter and buffer of `model` in place from `seed`; returns the model."""
    g = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if leaf == "weight" and p.dim() == 1:  # norms
            v = 1.0 + normal(p.shape, 0.1)
        elif leaf == "weight" and parent == "embed":
            v = normal(p.shape, 1.0)
        elif leaf == "weight" or leaf == "fn":
            v = normal(p.shape, p.shape[1] ** -0.5)
        elif leaf == "scale":
            v = 0.5 + torch.rand(p.shape, generator=g)
        elif leaf in ("base", "bias", "attn_sink") or leaf == "ape":
            v = normal(p.shape, 0.5)
        else:
            raise ValueError(f"init_random: no rule for parameter {name}")
        p.copy_(v.to(p.dtype))
    e, k = model.cfg.n_routed_experts, model.cfg.top_k
    for name, b in model.named_buffers():
        if name.endswith("tid2eid"):
            b.copy_(torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(b.shape[0])]))
    return model
