"""Grouped expert GEMMs with fused clamped SwiGLU: Triton against the reference, the reference
against the model's MoE.routed (all experts, and one expert-parallel rank's subset)."""

from __future__ import annotations

import pytest
import torch

from kernels import moe_ref as ref
from kernels import moe_triton as tri
from workers.model.moe import MoE
from workers.model.presets import tiny

pytestmark = pytest.mark.kernels


def _problem(n: int, hid: int, inter: int, n_exp: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hid, generator=g) * 3.0
    w1 = torch.randn(n_exp, inter, hid, generator=g) * 0.3
    w3 = torch.randn(n_exp, inter, hid, generator=g) * 0.3
    w2 = torch.randn(n_exp, hid, inter, generator=g) * 0.1
    ids = torch.stack(
        [torch.randperm(n_exp + 2, generator=g)[:k] for _ in range(n)]
    )  # some ids held elsewhere
    weights = torch.rand(n, k, generator=g)
    return x, weights, ids, w1, w2, w3


@pytest.mark.parametrize(
    "n,hid,inter,n_exp,k,act_group",
    [(37, 128, 128, 4, 2, None), (37, 128, 128, 4, 2, 128), (1, 64, 96, 3, 2, 32), (70, 32, 64, 6, 3, None)],
)
def test_grouped_experts_match_reference(
    n: int, hid: int, inter: int, n_exp: int, k: int, act_group: int | None, device: torch.device
) -> None:
    x, weights, ids, w1, w2, w3 = _problem(n, hid, inter, n_exp, k, seed=n + hid + n_exp)
    experts = list(range(n_exp))[::-1]  # stacked order differs from id order
    args = (w1, w2, w3, experts, 10.0, act_group)
    want = ref.routed_experts(x, weights, ids, *args)
    on = [t.to(device) if isinstance(t, torch.Tensor) else t for t in (x, weights, ids, *args)]
    got = tri.routed_experts(*on)
    scale = float(want.abs().max())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5 * scale)
    # The SwiGLU clamp is active in these problems (else the fused clamp would go untested).
    pre = torch.einsum("nh,eih->nei", x, w1)
    assert bool((pre > 10).any())


@pytest.mark.parametrize("local", [None, (1, 3)])
def test_reference_reproduces_the_models_routed_experts(local: tuple[int, ...] | None) -> None:
    """A float64 MoE sums its experts in-module (float32 models call kernels.ops): all experts,
    and one expert-parallel rank's subset. Without FP8 simulation, whose rounding would differ
    between float64 and float32 inputs."""
    cfg = tiny()
    moe = MoE(cfg, hashed=False, sim=False, local_experts=local).double()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x = torch.randn(9, cfg.hidden_size, generator=g, dtype=torch.float64)
    token_ids = torch.randint(0, cfg.vocab_size, (9,), generator=g)
    weights, ids = moe.gate(x, token_ids)
    experts = moe.local_experts
    stack = [
        torch.stack([getattr(moe.experts[str(e)], w).weight.float() for e in experts])
        for w in ("w1", "w2", "w3")
    ]
    with torch.no_grad():
        got = ref.routed_experts(x.float(), weights.float(), ids, *stack, experts, cfg.swiglu_limit, None)
        want = moe.routed(x, token_ids)
    assert want.dtype == torch.float64
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
