"""Torch references of attention with a sink: the model's dense form and the paged sparse decode.

Both compute, per query and head, softmax over the visible keys plus one extra per-head "sink"
logit that only enlarges the denominator; keys are also the values (MQA, K == V).
"""

from __future__ import annotations

import torch

from kernels.entry_format import EntryFormat, gather_paged


def attend_with_sink(
    q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [T, H, D], keys (= values) [S, D], mask [T, S] bool, sink [H] -> [T, H, D] in q's dtype.

    Exactly workers.model.attention.Attention._attend (float32 math); a query with no visible key
    gets zeros.
    """
    logits = torch.einsum("thd,sd->ths", q.float(), keys.float()) * scale
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    sink_col = sink.float()[None, :, None].expand(q.shape[0], -1, 1)
    probs = torch.cat([logits, sink_col], dim=-1).softmax(dim=-1)[..., :-1]
    return torch.einsum("ths,sd->thd", probs, keys.float()).to(q.dtype)


def sparse_decode_keys(
    b: int,
    window_pool: torch.Tensor,
    window_table: torch.Tensor,
    seq_lens: torch.Tensor,
    window: int,
    entry_pool: torch.Tensor,
    entry_table: torch.Tensor,
    entry_idx: torch.Tensor,
    fmt: EntryFormat,
) -> torch.Tensor:
    """The float32 keys [w + k, D] sequence b attends: its window, then its selected entries."""
    n = int(seq_lens[b])
    pos = torch.arange(max(0, n - window), n, device=window_pool.device)
    win = fmt.decode(gather_paged(window_pool, window_table[b], pos))
    idx = entry_idx[b][entry_idx[b] >= 0].long()
    ent = fmt.decode(gather_paged(entry_pool, entry_table[b], idx))
    return torch.cat([win, ent], dim=0)


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
) -> torch.Tensor:
    """One decode query per sequence over paged 584-byte entries -> [B, H, D] in q's dtype.

    q [B, H, D]: sequence b's query at position seq_lens[b] - 1 (its own KV already written).
    window_pool / entry_pool: uint8 [pages, slots, nbytes] views; window_table [B, *] maps window
    page i (positions [i * slots, (i + 1) * slots)) to a physical page; entry_table [B, *] likewise
    for compressed entries. Keys: window positions max(0, L - window) .. L - 1, then the logical
    entries entry_idx[b] (int32 [B, K], -1 = no entry; CSA passes the indexer's top-k, HCA every
    visible entry). Equals attend_with_sink over those keys with every mask bit set.
    """
    fmt.check_pool(window_pool, "sparse_decode_attention window_pool")
    fmt.check_pool(entry_pool, "sparse_decode_attention entry_pool")
    out = []
    for b in range(q.shape[0]):
        keys = sparse_decode_keys(
            b, window_pool, window_table, seq_lens, window, entry_pool, entry_table, entry_idx, fmt
        )
        mask = torch.ones(1, keys.shape[0], dtype=torch.bool, device=q.device)
        out.append(attend_with_sink(q[b : b + 1], keys, mask, sink, scale))
    return torch.cat(out, dim=0)
