"""Triton lightning indexer: scores (float keys or paged FP4 / FP8 key bytes) and top-k selection.

Scores: one program per (query, block of keys); the heads' dot products are one tl.dot, ReLU'd
and weighted. Top-k: one program per row. Short rows rank every entry against every other in one tile; long
rows find the k-th largest score exactly by a 32-step bitwise search over order-preserving
integer images of the float32 scores. Both write the ids of the selected entries in ascending
order, ties going to the lower id (the reference's choice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.buffers import new_output
from kernels.formats_triton import fp4_e2m1_decode, fp8_e4m3_decode, ue8m0_to_scale
from kernels.indexer_ref import FP4_GROUP, KeyFormat

MIN_DOT = 16
TOPK_SMALL = 128  # rows up to this many visible entries take the one-tile ranking path


@triton.jit
def _weighted_relu(q, w, k):
    """sum_h w[h] * relu(q[h] . k[n]) for q [H, D], w [H], k [N, D] -> [N]."""
    dots = tl.maximum(tl.dot(q, tl.trans(k), input_precision="ieee"), 0.0)
    return tl.sum(dots * w[:, None], axis=0)


@triton.jit
def _scores_kernel(
    q_ptr, sq_t, sq_h, w_ptr, sw_t, k_ptr, sk_n, o_ptr, so_t, H, N, D,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    hm, dm, nm = h < H, d < D, n < N
    q = tl.load(q_ptr + t * sq_t + h[:, None] * sq_h + d[None, :], mask=hm[:, None] & dm[None, :], other=0.0)
    w = tl.load(w_ptr + t * sw_t + h, mask=hm, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + n[:, None] * sk_n + d[None, :], mask=nm[:, None] & dm[None, :], other=0.0)
    s = _weighted_relu(q.to(tl.float32), w, k.to(tl.float32))
    tl.store(o_ptr + t * so_t + n, s, mask=nm)


def index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Triton twin of kernels.indexer_ref.index_scores."""
    if q.dim() != 3 or tuple(w.shape) != q.shape[:2] or keys.dim() != 2 or keys.shape[1] != q.shape[2]:
        raise ValueError(
            f"index_scores: want q [T, H, D], w [T, H], keys [n, D];"
            f" got {tuple(q.shape)}, {tuple(w.shape)}, {tuple(keys.shape)}"
        )
    t, h, d = q.shape
    n = keys.shape[0]
    out = new_output((t, n), torch.float32, q.device)
    if t and n:
        qc, wc, kc = q.contiguous(), w.contiguous(), keys.contiguous()
        block_n = 32 if q.is_cuda else 128  # the interpreter's cost is mostly per program
        _scores_kernel[(t, triton.cdiv(n, block_n))](
            qc, qc.stride(0), qc.stride(1), wc, wc.stride(0), kc, kc.stride(0), out, out.stride(0), h, n, d,
            BLOCK_H=max(MIN_DOT, triton.next_power_of_2(h)), BLOCK_N=block_n,
            BLOCK_D=triton.next_power_of_2(d),
        )  # fmt: skip
    return out


@triton.jit
def _load_keys(pool_ptr, base, valid, D: tl.constexpr, FP4: tl.constexpr, GROUP: tl.constexpr):
    """float32 [N, D] keys decoded from byte offsets base [N] (int64)."""
    d = tl.arange(0, D)
    row = pool_ptr + base[:, None]
    m = valid[:, None] & (d[None, :] < D)
    if FP4:
        byte = tl.load(row + d[None, :] // 2, mask=m, other=0).to(tl.int32)
        code = tl.where((d[None, :] % 2) == 0, byte & 15, byte >> 4)
        e = tl.load(row + D // 2 + d[None, :] // GROUP, mask=m, other=127).to(tl.int32)
        k = fp4_e2m1_decode(code) * ue8m0_to_scale(e)
    else:
        code = tl.load(row + d[None, :], mask=m, other=0)
        b0 = tl.load(row + D, mask=valid[:, None], other=0).to(tl.int32)
        b1 = tl.load(row + D + 1, mask=valid[:, None], other=0).to(tl.int32)
        b2 = tl.load(row + D + 2, mask=valid[:, None], other=0).to(tl.int32)
        b3 = tl.load(row + D + 3, mask=valid[:, None], other=0).to(tl.int32)
        scale = (b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)).to(tl.float32, bitcast=True)
        k = fp8_e4m3_decode(code) * scale
    return k


@triton.jit
def _paged_scores_kernel(
    q_ptr, sq_b, sq_h, w_ptr, sw_b, pool_ptr, sp_page, sp_slot, kt_ptr, skt_b, nk_ptr, o_ptr, so_b, H, MAX_N,
    SLOTS: tl.constexpr, D: tl.constexpr, FP4: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    s = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, D)
    hm = h < H
    n_b = tl.load(nk_ptr + b)
    valid = s < n_b
    q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + d[None, :], mask=hm[:, None], other=0.0).to(tl.float32)
    w = tl.load(w_ptr + b * sw_b + h, mask=hm, other=0.0).to(tl.float32)
    page = tl.load(kt_ptr + b * skt_b + s // SLOTS, mask=valid, other=0).to(tl.int64)
    k = _load_keys(pool_ptr, page * sp_page + (s % SLOTS) * sp_slot, valid, D, FP4, GROUP)
    sc = tl.where(valid, _weighted_relu(q, w, k), float("-inf"))
    tl.store(o_ptr + b * so_b + s, sc, mask=s < MAX_N)


def index_scores_paged(
    q: torch.Tensor,
    w: torch.Tensor,
    key_pool: torch.Tensor,
    key_table: torch.Tensor,
    n_keys: torch.Tensor,
    max_keys: int,
    fmt: KeyFormat,
) -> torch.Tensor:
    """Triton twin of kernels.indexer_ref.index_scores_paged."""
    bsz, h, dim = q.shape
    if dim & (dim - 1):
        raise ValueError(f"index_scores_paged: key dim {dim} must be a power of two")
    nb = fmt.nbytes(dim)
    if (
        key_pool.dtype != torch.uint8
        or key_pool.dim() != 3
        or key_pool.shape[2] != nb
        or key_pool.stride(2) != 1
    ):
        raise ValueError(
            f"index_scores_paged: key_pool must be a uint8 [pages, slots, {nb}] view,"
            f" got {tuple(key_pool.shape)}"
        )
    if key_table.dim() != 2 or key_table.shape[0] != bsz or tuple(n_keys.shape) != (bsz,):
        raise ValueError(
            f"index_scores_paged: key_table [{bsz}, *], n_keys [{bsz}];"
            f" got {tuple(key_table.shape)}, {tuple(n_keys.shape)}"
        )
    out = new_output((bsz, max_keys), torch.float32, q.device)
    if bsz and max_keys:
        qc, wc, kt = q.contiguous(), w.contiguous(), key_table.contiguous()
        _paged_scores_kernel[(bsz, triton.cdiv(max_keys, 32))](
            qc, qc.stride(0), qc.stride(1), wc, wc.stride(0),
            key_pool, key_pool.stride(0), key_pool.stride(1),
            kt, kt.stride(0), n_keys.to(torch.int32).contiguous(), out, out.stride(0), h, max_keys,
            SLOTS=key_pool.shape[1], D=dim, FP4=fmt is KeyFormat.FP4, GROUP=FP4_GROUP,
            BLOCK_H=max(MIN_DOT, triton.next_power_of_2(h)), BLOCK_N=32,
        )  # fmt: skip
    return out


@triton.jit
def _ordered(x):
    """uint32 images of float32 x, ordered as the floats are (-0.0 and 0.0 are one value, as
    torch's sort has them)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.uint32, bitcast=True)
    neg = (bits >> 31) == 1
    return tl.where(neg, ~bits, bits | 0x80000000)


@triton.jit
def _topk_small(row, out, lim, kk, BLOCK_N: tl.constexpr):
    """Rows that fit one tile: rank every entry against every other (ties: lower id first)."""
    n = tl.arange(0, BLOCK_N)
    inside = n < lim
    u = _ordered(tl.load(row + n, mask=inside, other=0.0))
    ahead = (u[:, None] > u[None, :]) | ((u[:, None] == u[None, :]) & (n[:, None] < n[None, :]))
    rank = tl.sum((ahead & inside[:, None]).to(tl.int32), axis=0)
    take = (inside & (rank < kk)).to(tl.int32)
    tl.store(out + tl.cumsum(take, 0) - take, n, mask=take == 1)


@triton.jit
def _topk_large(row, out, lim, kk, BLOCK_N: tl.constexpr):
    """Long rows: find the kk-th largest image exactly (set bits from the top while at least kk
    images stay >= it), then write the larger ones and the first ties in one ascending pass."""
    thr = tl.zeros((), tl.uint32)
    for bit in tl.static_range(31, -1, -1):
        cand = thr | (tl.full((), 1, tl.uint32) << bit)
        cnt = 0
        for n0 in range(0, lim, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            u = _ordered(tl.load(row + n, mask=n < lim, other=0.0))
            cnt += tl.sum(((u >= cand) & (n < lim)).to(tl.int32))
        thr = tl.where(cnt >= kk, cand, thr)
    greater = 0
    for n0 in range(0, lim, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        u = _ordered(tl.load(row + n, mask=n < lim, other=0.0))
        greater += tl.sum(((u > thr) & (n < lim)).to(tl.int32))
    ties_wanted = kk - greater
    written = 0
    ties_seen = 0
    for n0 in range(0, lim, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        inside = n < lim
        u = _ordered(tl.load(row + n, mask=inside, other=0.0))
        tie = (inside & (u == thr)).to(tl.int32)
        tie_rank = ties_seen + tl.cumsum(tie, 0) - tie
        take = ((inside & (u > thr)) | ((tie == 1) & (tie_rank < ties_wanted))).to(tl.int32)
        tl.store(out + written + tl.cumsum(take, 0) - take, n, mask=take == 1)
        written += tl.sum(take)
        ties_seen += tl.sum(tie)


@triton.jit
def _topk_kernel(s_ptr, ss_t, lim_ptr, o_ptr, so_t, N, K, BLOCK_N: tl.constexpr, SMALL: tl.constexpr):
    t = tl.program_id(0)
    lim = tl.minimum(tl.load(lim_ptr + t), N)
    kk = tl.minimum(K, lim)
    if lim <= SMALL:
        _topk_small(s_ptr + t * ss_t, o_ptr + t * so_t, lim, kk, SMALL)
    else:
        _topk_large(s_ptr + t * ss_t, o_ptr + t * so_t, lim, kk, BLOCK_N)
    for p0 in range(kk, K, BLOCK_N):
        p = p0 + tl.arange(0, BLOCK_N)
        tl.store(o_ptr + t * so_t + p, tl.full([BLOCK_N], -1, tl.int32), mask=p < K)


def topk_indices(scores: torch.Tensor, limits: torch.Tensor, k: int) -> torch.Tensor:
    """Triton twin of kernels.indexer_ref.topk_indices."""
    if scores.dim() != 2 or tuple(limits.shape) != (scores.shape[0],) or k < 0:
        raise ValueError(
            f"topk_indices: scores [T, n], limits [T], k >= 0;"
            f" got {tuple(scores.shape)}, {tuple(limits.shape)}, {k}"
        )
    t, n = scores.shape
    out = new_output((t, k), torch.int32, scores.device)
    if t and k:
        sc = scores.float().contiguous()
        _topk_kernel[(t,)](
            sc, sc.stride(0), limits.to(torch.int32).contiguous(), out, out.stride(0), n, k,
            BLOCK_N=128, SMALL=TOPK_SMALL,
        )  # fmt: skip
    return out


def topk_mask(scores: torch.Tensor, limits: torch.Tensor, k: int) -> torch.Tensor:
    """Triton twin of kernels.indexer_ref.topk_mask (the ids come from the Triton top-k)."""
    idx = topk_indices(scores, limits, k).long()
    mask = torch.zeros(scores.shape[0], scores.shape[1] + 1, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, torch.where(idx < 0, scores.shape[1], idx), True)
    return mask[:, :-1]
