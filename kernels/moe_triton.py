"""Triton MoE: grouped expert GEMMs over tokens sorted by expert, clamped SwiGLU fused into the first.

Plan: (token, slot) pairs are sorted by expert (stable); a host-built tile list assigns each
_block_m rows of one expert to a program, so one launch covers every expert. GEMM 1 computes the
W1 and W3 products of a tile together and applies clamp, SiLU, product and routing weight in
registers (h never exists unfused); GEMM 2 applies W2. A per-token index_add in expert order
combines the outputs, the order the reference sums them in. Same contract as
kernels.moe_ref.routed_experts; FP8 input simulation runs the Triton quantisation kernels.
Dots are float32 ("ieee"), or bf16 tensor-core dots with float32 accumulation when activations
and weights are bf16 on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.buffers import new_output
from kernels.moe_ref import check_experts
from kernels.quant_triton import fp8_e4m3_dequantize, fp8_e4m3_quantize


def _act_quant(x: torch.Tensor, act_group: int | None) -> torch.Tensor:
    if act_group is None or not x.numel():
        return x
    q, e = fp8_e4m3_quantize(x, act_group)
    return fp8_e4m3_dequantize(q, e, act_group).to(x.dtype)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, sa_m, w_ptr, sw_e, sw_n, w3_ptr, rw_ptr, o_ptr, so_m,
    te_ptr, t0_ptr, t1_ptr, N, K, limit,
    SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BF16: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    e = tl.load(te_ptr + tile).to(tl.int64)
    r0, r1 = tl.load(t0_ptr + tile), tl.load(t1_ptr + tile)
    r = r0 + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm, nm = r < r1, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        a = tl.load(a_ptr + r[:, None] * sa_m + k[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        woff = e * sw_e + n[None, :] * sw_n + k[:, None]
        w = tl.load(w_ptr + woff, mask=nm[None, :] & km[:, None], other=0.0)
        if BF16:
            acc += tl.dot(a, w)
        else:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        if SWIGLU:
            w3 = tl.load(w3_ptr + woff, mask=nm[None, :] & km[:, None], other=0.0)
            if BF16:
                acc3 += tl.dot(a, w3)
            else:
                acc3 += tl.dot(a.to(tl.float32), w3.to(tl.float32), input_precision="ieee")
    if SWIGLU:
        gate = tl.minimum(acc, limit)
        up = tl.minimum(tl.maximum(acc3, -limit), limit)
        rw = tl.load(rw_ptr + r, mask=rm, other=0.0)
        acc = gate * tl.sigmoid(gate) * up * rw[:, None]
    tl.store(o_ptr + r[:, None] * so_m + n[None, :], acc, mask=rm[:, None] & nm[None, :])


def _block_m(device: torch.device) -> int:
    """Rows per tile: 32 on a GPU; 64 in the interpreter, whose cost is mostly per program."""
    return 32 if device.type == "cuda" else 64


def _tiles(counts: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert, first row, end row) of every _block_m-row tile of the expert-sorted rows."""
    te, t0, t1, start = [], [], [], 0
    for e, c in enumerate(counts):
        for r in range(start, start + c, _block_m(device)):
            te.append(e)
            t0.append(r)
            t1.append(start + c)
        start += c

    def as_t(v: list[int]) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.int32, device=device)

    return as_t(te), as_t(t0), as_t(t1)


def _gemm(
    a: torch.Tensor, w: torch.Tensor, tiles: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    w3: torch.Tensor | None, rw: torch.Tensor | None, limit: float,
) -> torch.Tensor:  # fmt: skip
    m, k = a.shape
    n = w.shape[1]
    out = new_output((m, n), torch.float32, a.device)
    te, t0, t1 = tiles
    if te.numel():
        block_n = min(64 if a.is_cuda else 128, max(16, triton.next_power_of_2(n)))
        _grouped_gemm_kernel[(te.numel(), triton.cdiv(n, block_n))](
            a, a.stride(0), w, w.stride(0), w.stride(1), w if w3 is None else w3,
            a if rw is None else rw, out, out.stride(0), te, t0, t1, n, k, float(limit),
            SWIGLU=w3 is not None, BLOCK_M=_block_m(a.device), BLOCK_N=block_n, BLOCK_K=64,
            BF16=a.is_cuda and a.dtype == torch.bfloat16 and w.dtype == torch.bfloat16,
        )  # fmt: skip
    return out


def routed_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    experts: Sequence[int],
    limit: float,
    act_group: int | None,
) -> torch.Tensor:
    """Triton twin of kernels.moe_ref.routed_experts (same contract)."""
    check_experts(x, weights, ids, w1, w2, w3, experts)
    n_tok, hid = x.shape
    y = torch.zeros(n_tok, hid, dtype=torch.float32, device=x.device)
    # Stacked row of each pair's expert (-1: not held here), ordered by expert id.
    order = sorted(range(len(experts)), key=lambda i: experts[i])
    top = max(max(experts, default=0), int(ids.max()) if ids.numel() else 0)
    lookup = torch.full((top + 1,), -1, dtype=torch.int64)
    lookup[torch.tensor([experts[i] for i in order], dtype=torch.int64)] = torch.arange(len(order))
    rank = lookup.to(x.device)[ids.reshape(-1).long()]
    held = torch.where(rank >= 0)[0]
    if not held.numel():
        return y
    sort = torch.sort(rank[held], stable=True)
    pair = held[sort.indices]
    tok = pair // ids.shape[1]
    counts = torch.bincount(sort.values, minlength=len(order)).tolist()
    tiles = _tiles(counts, x.device)
    perm = torch.tensor(order, dtype=torch.int64, device=x.device)
    w1s, w2s, w3s = (w[perm].contiguous() for w in (w1, w2, w3))
    xs = _act_quant(x, act_group)[tok].contiguous()
    rw = weights.reshape(-1)[pair].float().contiguous()
    h = _gemm(xs.to(w1.dtype), w1s, tiles, w3s, rw, limit).to(x.dtype)
    out = _gemm(_act_quant(h, act_group).to(w2.dtype).contiguous(), w2s, tiles, None, None, limit)
    return y.index_add_(0, tok, out)
