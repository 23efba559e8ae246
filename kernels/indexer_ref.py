"""Torch references of the lightning indexer: scores over compressed keys, and top-k selection.

score(t, s) = sum_h w[t, h] * ReLU(q[t, h] . K[s])   (workers.model.indexer.Indexer.scores after
its projections). Keys come as float rows, or as paged bytes in one of two formats:
  FP4: dim / 2 bytes of packed e2m1 (element 2i in the low nibble), then dim / 32 UE8M0 bytes;
  FP8: dim bytes of e4m3, then one float32 scale (little-endian).
Top-k: per query row t, among entries s < limit[t] (the visible ones), the min(k, limit[t])
highest scores; ties go to the lower index (a stable order, so two correct paths agree).
"""

from __future__ import annotations

import enum

import torch

from kernels.quant import fp4_e2m1_dequantize

FP4_GROUP = 32


class KeyFormat(enum.Enum):
    """Byte format of a stored indexer key."""

    FP4 = "fp4"
    FP8 = "fp8"

    def nbytes(self, dim: int) -> int:
        """Bytes of one key of `dim` dims."""
        if self is KeyFormat.FP4:
            if dim <= 0 or dim % FP4_GROUP:
                raise ValueError(f"KeyFormat.FP4: dim {dim} must be a positive multiple of {FP4_GROUP}")
            return dim // 2 + dim // FP4_GROUP
        return dim + 4

    def decode(self, raw: torch.Tensor, dim: int) -> torch.Tensor:
        """uint8 [..., nbytes] -> float32 [..., dim]."""
        if raw.shape[-1] != self.nbytes(dim):
            raise ValueError(
                f"KeyFormat.{self.name}.decode: last dim of {tuple(raw.shape)} must be {self.nbytes(dim)}"
            )
        raw = raw.contiguous()
        if self is KeyFormat.FP4:
            return fp4_e2m1_dequantize(raw[..., : dim // 2], raw[..., dim // 2 :], FP4_GROUP)
        q = raw[..., :dim].view(torch.float8_e4m3fn).float()
        return q * raw[..., dim:].contiguous().view(torch.float32)


def index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q [T, H, D], w [T, H], keys [n, D] -> float32 scores [T, n]."""
    dots = torch.einsum("thd,nd->thn", q.float(), keys.float()).relu()
    return (dots * w.float().unsqueeze(-1)).sum(dim=1)


def index_scores_paged(
    q: torch.Tensor,
    w: torch.Tensor,
    key_pool: torch.Tensor,
    key_table: torch.Tensor,
    n_keys: torch.Tensor,
    max_keys: int,
    fmt: KeyFormat,
) -> torch.Tensor:
    """Decode-time scores [B, max_keys] float32 of one query per sequence against its paged keys.

    key_pool: uint8 [pages, slots, nbytes] view; key s of sequence b lives in page
    key_table[b, s // slots], slot s % slots. Entries s >= n_keys[b] are -inf.
    """
    bsz, _, dim = q.shape
    out = torch.full((bsz, max_keys), float("-inf"), dtype=torch.float32, device=q.device)
    slots = key_pool.shape[1]
    for b in range(bsz):
        n = int(n_keys[b])
        if n == 0:
            continue
        s = torch.arange(n, device=q.device)
        raw = key_pool[key_table[b, s // slots].long(), s % slots]
        out[b, :n] = index_scores(q[b : b + 1], w[b : b + 1], fmt.decode(raw, dim))[0]
    return out


def topk_indices(scores: torch.Tensor, limits: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [T, k]: per row the selected entry ids in ascending order, then -1 padding."""
    t, n = scores.shape
    out = torch.full((t, k), -1, dtype=torch.int32, device=scores.device)
    for i in range(t):
        lim = min(int(limits[i]), n)
        kk = min(k, lim)
        order = torch.sort(scores[i, :lim], descending=True, stable=True).indices[:kk]
        out[i, :kk] = torch.sort(order).values.to(torch.int32)
    return out


def topk_mask(scores: torch.Tensor, limits: torch.Tensor, k: int) -> torch.Tensor:
    """bool [T, n]: the entries topk_indices selects (workers.model.indexer.Indexer.select's mask)."""
    idx = topk_indices(scores, limits, k).long()
    mask = torch.zeros(scores.shape[0], scores.shape[1] + 1, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, torch.where(idx < 0, scores.shape[1], idx), True)
    return mask[:, :-1]
