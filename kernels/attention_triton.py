"""Triton attention with a sink: the model's dense masked form, and paged sparse decode.

Both run an online softmax per (query, block of heads) whose running max starts at the sink logit
and whose denominator starts at exp(0) = 1, so the sink needs no extra column and a query with no
visible key returns zeros (as the reference does). MQA: every head reads the same key rows, which
double as values, so one key tile feeds both dots.

Dots run in float32 ("ieee") for float32 queries and in bf16 with float32 accumulation for bf16
queries: keys from the 584-byte layout are exactly representable in bf16 (3-bit FP8 mantissa times
a power of two, or bf16 rope dims), so only the probabilities are rounded, as in FlashAttention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.buffers import new_output
from kernels.entry_format import EntryFormat
from kernels.formats_triton import fp8_e4m3_decode, ue8m0_to_scale

MIN_DOT = 16  # tl.dot needs every dim >= 16


def _dense_block_m(q: torch.Tensor) -> int:
    """(query, head) rows per program of the dense kernel: 64 on a GPU (registers); 256 in the
    interpreter, whose cost is mostly per program."""
    return 64 if q.is_cuda else 256


def _head_block(h: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(h))


SPARSE_BLOCK_N = 32  # keys per tile of the sparse decode kernel


def _splits(q: torch.Tensor, programs: int, max_keys: int) -> int:
    """Key splits for sparse decode: on a GPU about two programs per SM, each split at least four
    tiles long; one split in the interpreter."""
    if not q.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, programs), max_keys // (4 * SPARSE_BLOCK_N)))


def _bf16_dots(q: torch.Tensor) -> bool:
    """bf16 tensor-core dots for bf16 queries on a GPU. The interpreter's bf16 dot is not
    faithful, so there the same kernel computes the dots in float32."""
    return q.dtype == torch.bfloat16 and q.is_cuda


@triton.jit
def _online_step(q, k, valid, m_i, l_i, acc, scale, BF16: tl.constexpr):
    """Fold one key tile k [N, D] (valid [N]) into the running (max, denominator, accumulator)."""
    if BF16:
        s = tl.dot(q.to(tl.bfloat16), tl.trans(k.to(tl.bfloat16)))
    else:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    s = tl.where(valid, s * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if BF16:
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), k.to(tl.bfloat16))
    else:
        acc = acc * alpha[:, None] + tl.dot(p, k, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _dense_kernel(
    q_ptr, k_ptr, sk_s, m_ptr, sm_t, sink_ptr, o_ptr, ROWS, H, S, D, scale,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BF16: tl.constexpr,
):  # fmt: skip
    # Rows are (query, head) pairs of the contiguous q [T, H, D]: all heads of a query and several
    # queries share one pass over the keys (MQA), which fills the dot's M dimension.
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    rm, dm = r < ROWS, d < D
    t, h = r // H, r % H
    q = tl.load(q_ptr + r[:, None] * D + d[None, :], mask=rm[:, None] & dm[None, :], other=0.0)
    q = q.to(tl.float32)
    m_i = tl.load(sink_ptr + h, mask=rm, other=0.0).to(tl.float32)
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        sm = s < S
        k = tl.load(k_ptr + s[:, None] * sk_s + d[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
        vm = rm[:, None] & sm[None, :]
        vis = tl.load(m_ptr + t[:, None] * sm_t + s[None, :], mask=vm, other=0) != 0
        m_i, l_i, acc = _online_step(q, k.to(tl.float32), vis, m_i, l_i, acc, scale, BF16)
    o = acc / l_i[:, None]
    tl.store(o_ptr + r[:, None] * D + d[None, :], o, mask=rm[:, None] & dm[None, :])


def attend_with_sink(
    q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """Triton twin of kernels.attention_ref.attend_with_sink (same contract)."""
    if q.dim() != 3 or keys.dim() != 2 or keys.shape[1] != q.shape[2]:
        raise ValueError(
            f"attend_with_sink: q [T, H, D], keys [S, D]; got {tuple(q.shape)}, {tuple(keys.shape)}"
        )
    t, h, d = q.shape
    if tuple(mask.shape) != (t, keys.shape[0]) or mask.dtype != torch.bool:
        raise ValueError(
            f"attend_with_sink: mask must be bool {(t, keys.shape[0])}, got {mask.dtype} {tuple(mask.shape)}"
        )
    if tuple(sink.shape) != (h,):
        raise ValueError(f"attend_with_sink: sink must be [{h}], got {tuple(sink.shape)}")
    q = q.contiguous()
    k = keys.contiguous()
    m = mask.contiguous().view(torch.uint8)
    out = new_output((t, h, d), torch.float32, q.device)
    rows = t * h
    if rows:
        block_m = _dense_block_m(q)
        _dense_kernel[(triton.cdiv(rows, block_m),)](
            q, k, k.stride(0), m, m.stride(0), sink.float().contiguous(), out, rows, h, keys.shape[0], d,
            float(scale), BLOCK_M=block_m, BLOCK_S=64, BLOCK_D=triton.next_power_of_2(d),
            BF16=_bf16_dots(q),
        )  # fmt: skip
    return out.to(q.dtype)


@triton.jit
def _load_entries(
    pool_ptr, base, valid,
    NOPE: tl.constexpr, ROPE: tl.constexpr, GROUP: tl.constexpr, SCALE_OFF: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """float32 [N, BLOCK_D] keys decoded from entries at byte offsets base [N] (int64) of the pool."""
    d = tl.arange(0, BLOCK_D)
    is_nope = d < NOPE
    is_rope = (d >= NOPE) & (d < NOPE + ROPE)
    row = pool_ptr + base[:, None]
    nm = valid[:, None] & is_nope[None, :]
    code = tl.load(row + d[None, :], mask=nm, other=0)
    e = tl.load(row + SCALE_OFF + d[None, :] // GROUP, mask=nm, other=127).to(tl.int32)
    nope = fp8_e4m3_decode(code) * ue8m0_to_scale(e)
    rm = valid[:, None] & is_rope[None, :]
    rd = NOPE + 2 * (d - NOPE)
    lo = tl.load(row + rd[None, :], mask=rm, other=0).to(tl.int32)
    hi = tl.load(row + rd[None, :] + 1, mask=rm, other=0).to(tl.int32)
    rope = (((hi << 8) | lo) << 16).to(tl.float32, bitcast=True)
    return tl.where(is_nope[None, :], nope, rope)


@triton.jit
def _sparse_decode_kernel(
    q_ptr, sq_b, sq_h, o_ptr, so_b, so_h, sink_ptr,
    w_ptr, sw_page, sw_slot, wt_ptr, swt_b, len_ptr,
    e_ptr, se_page, se_slot, et_ptr, set_b, ei_ptr, sei_b, n_idx,
    ws_ptr, B, H, scale, WINDOW, W_CHUNK, I_CHUNK,
    W_SLOTS: tl.constexpr, E_SLOTS: tl.constexpr,
    NOPE: tl.constexpr, ROPE: tl.constexpr, GROUP: tl.constexpr, SCALE_OFF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BF16: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    """Program (b, head block, split): split `sp` folds window positions and listed entries of its
    own chunk. Without SPLIT it writes the output; with SPLIT it writes (max, denominator,
    accumulator) to the workspace for _combine_kernel. Only split 0 carries the sink."""
    b = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    sp = tl.program_id(2)
    d = tl.arange(0, BLOCK_D)
    hm, dm = h < H, d < NOPE + ROPE
    q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + d[None, :], mask=hm[:, None] & dm[None, :], other=0.0)
    q = q.to(tl.float32)
    sink = tl.load(sink_ptr + h, mask=hm, other=0.0).to(tl.float32)
    # A split without the sink starts from a finite "minus infinity" so empty tiles stay NaN-free.
    m_i = tl.where(sp == 0, sink, -1e30)
    l_i = tl.where(sp == 0, 1.0, 0.0) + tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    n = tl.load(len_ptr + b)
    # The window: positions max(0, n - WINDOW) .. n - 1, page pos // W_SLOTS, slot pos % W_SLOTS.
    w0 = tl.maximum(n - WINDOW, 0) + sp * W_CHUNK
    w1 = tl.minimum(w0 + W_CHUNK, n)
    for s0 in range(w0, w1, BLOCK_N):
        pos = s0 + tl.arange(0, BLOCK_N)
        valid = pos < w1
        page = tl.load(wt_ptr + b * swt_b + pos // W_SLOTS, mask=valid, other=0).to(tl.int64)
        base = page * sw_page + (pos % W_SLOTS) * sw_slot
        k = _load_entries(w_ptr, base, valid, NOPE, ROPE, GROUP, SCALE_OFF, BLOCK_D)
        m_i, l_i, acc = _online_step(q, k, valid[None, :], m_i, l_i, acc, scale, BF16)
    # The selected compressed entries (logical ids, -1 = none).
    i_end = tl.minimum((sp + 1) * I_CHUNK, n_idx)
    for i0 in range(sp * I_CHUNK, i_end, BLOCK_N):
        i = i0 + tl.arange(0, BLOCK_N)
        j = tl.load(ei_ptr + b * sei_b + i, mask=i < i_end, other=-1)
        valid = j >= 0
        page = tl.load(et_ptr + b * set_b + j // E_SLOTS, mask=valid, other=0).to(tl.int64)
        base = page * se_page + (j % E_SLOTS) * se_slot
        k = _load_entries(e_ptr, base, valid, NOPE, ROPE, GROUP, SCALE_OFF, BLOCK_D)
        m_i, l_i, acc = _online_step(q, k, valid[None, :], m_i, l_i, acc, scale, BF16)
    if SPLIT:
        # Workspace rows [(sp * B + b) * H + h]: max, denominator, then the accumulator.
        row = (sp * B + b) * H + h
        tl.store(ws_ptr + row * (BLOCK_D + 2), m_i, mask=hm)
        tl.store(ws_ptr + row * (BLOCK_D + 2) + 1, l_i, mask=hm)
        tl.store(ws_ptr + row[:, None] * (BLOCK_D + 2) + 2 + d[None, :], acc, mask=hm[:, None])
    else:
        o = acc / l_i[:, None]
        tl.store(o_ptr + b * so_b + h[:, None] * so_h + d[None, :], o, mask=hm[:, None] & dm[None, :])


@triton.jit
def _combine_kernel(ws_ptr, o_ptr, so_b, so_h, B, H, D, SPLITS, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the splits' partial softmaxes: rescale each to the common max and add."""
    b = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    hm = h < H
    m = tl.full([BLOCK_H], -1e30, tl.float32)
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for sp in range(0, SPLITS):
        row = (sp * B + b) * H + h
        m_s = tl.load(ws_ptr + row * (BLOCK_D + 2), mask=hm, other=-1e30)
        l_s = tl.load(ws_ptr + row * (BLOCK_D + 2) + 1, mask=hm, other=0.0)
        a_s = tl.load(ws_ptr + row[:, None] * (BLOCK_D + 2) + 2 + d[None, :], mask=hm[:, None], other=0.0)
        m_new = tl.maximum(m, m_s)
        alpha, beta = tl.exp(m - m_new), tl.exp(m_s - m_new)
        l_sum = l_sum * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m = m_new
    o = acc / tl.where(hm, l_sum, 1.0)[:, None]  # padding heads have no keys and no sink
    tl.store(o_ptr + b * so_b + h[:, None] * so_h + d[None, :], o, mask=hm[:, None] & (d[None, :] < D))


def _check_table(table: torch.Tensor, batch: int, what: str) -> None:
    if table.dim() != 2 or table.shape[0] != batch or table.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"sparse_decode_attention: {what} must be int [{batch}, *],"
            f" got {table.dtype} {tuple(table.shape)}"
        )


def sparse_decode_attention(
    q: torch.Tensor,
    window_pool: torch.Tensor,
    window_table: torch.Tensor,
    seq_lens: torch.Tensor,
    window: int,
    entry_pool: torch.Tensor,
    entry_table: torch.Tensor,
    entry_idx: torch.Tensor,
    sink: torch.Tensor,
    scale: float,
    fmt: EntryFormat = EntryFormat(),
    *,
    splits: int | None = None,
) -> torch.Tensor:
    """Triton twin of kernels.attention_ref.sparse_decode_attention (same contract).

    `splits`: programs per (sequence, head block) along the keys, merged by a second kernel
    (flash-decoding); None picks enough to fill the GPU (1 off a GPU).
    """
    if q.dim() != 3 or q.shape[2] != fmt.head_dim:
        raise ValueError(f"sparse_decode_attention: q must be [B, H, {fmt.head_dim}], got {tuple(q.shape)}")
    bsz, h, d = q.shape
    fmt.check_pool(window_pool, "sparse_decode_attention window_pool")
    fmt.check_pool(entry_pool, "sparse_decode_attention entry_pool")
    _check_table(window_table, bsz, "window_table")
    _check_table(entry_table, bsz, "entry_table")
    _check_table(entry_idx, bsz, "entry_idx")
    if tuple(seq_lens.shape) != (bsz,):
        raise ValueError(f"sparse_decode_attention: seq_lens must be [{bsz}], got {tuple(seq_lens.shape)}")
    q = q.contiguous()
    out = new_output((bsz, h, d), torch.float32, q.device)
    wt, et = window_table.contiguous(), entry_table.contiguous()
    ei = entry_idx.to(torch.int32).contiguous()
    bh = _head_block(h)
    block_d = triton.next_power_of_2(d)
    n_split = _splits(q, bsz * triton.cdiv(h, bh), window + ei.shape[1]) if splits is None else splits
    if n_split < 1:
        raise ValueError(f"sparse_decode_attention: splits must be >= 1, got {n_split}")
    w_chunk = triton.cdiv(triton.cdiv(window, n_split), SPARSE_BLOCK_N) * SPARSE_BLOCK_N
    i_chunk = triton.cdiv(triton.cdiv(ei.shape[1], n_split), SPARSE_BLOCK_N) * SPARSE_BLOCK_N
    ws = new_output((n_split * bsz * h * (block_d + 2),), torch.float32, q.device) if n_split > 1 else out
    if bsz:
        _sparse_decode_kernel[(bsz, triton.cdiv(h, bh), n_split)](
            q, q.stride(0), q.stride(1), out, out.stride(0), out.stride(1), sink.float().contiguous(),
            window_pool, window_pool.stride(0), window_pool.stride(1), wt, wt.stride(0),
            seq_lens.to(torch.int32).contiguous(),
            entry_pool, entry_pool.stride(0), entry_pool.stride(1), et, et.stride(0), ei, ei.stride(0),
            ei.shape[1], ws, bsz, h, float(scale), window, w_chunk, i_chunk,
            W_SLOTS=window_pool.shape[1], E_SLOTS=entry_pool.shape[1],
            NOPE=fmt.nope_dim, ROPE=fmt.rope_dim, GROUP=fmt.group, SCALE_OFF=fmt.scale_offset,
            BLOCK_H=bh, BLOCK_N=SPARSE_BLOCK_N, BLOCK_D=block_d, BF16=_bf16_dots(q), SPLIT=n_split > 1,
        )  # fmt: skip
        if n_split > 1:
            _combine_kernel[(bsz, triton.cdiv(h, bh))](
                ws, out, out.stride(0), out.stride(1), bsz, h, d, n_split, BLOCK_H=bh, BLOCK_D=block_d
            )
    return out.to(q.dtype)
