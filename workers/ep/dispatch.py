"""Moving token rows between EP ranks: one interface, two paths, bytes counted.

`exchange(rows, send_counts, recv_counts)`: rows [R, W] are grouped by destination rank
(send_counts[r] rows for rank r, in rank order); the result is the rows every rank sent here,
grouped by source rank, and their counts. Pass `recv_counts` when they are already known (the
combine step: it returns exactly what dispatch received), which saves the count exchange.
- `VariableAllToAll`: the counts, then one all_to_all with uneven splits (least bytes).
- `PaddedAllToAll`: every message is `capacity` rows per rank pair, padded, so each collective has
  a fixed shape (what CUDA graphs need); more rows than capacity go in extra rounds, whose number
  the ranks agree on with one max-reduce.
`bytes_sent` counts what this rank put on the wire to OTHER ranks (padding included).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from workers.ep.group import EpGroup


class Dispatcher(Protocol):
    @property
    def bytes_sent(self) -> int: ...
    def exchange(
        self, rows: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, list[int]]: ...


def _check(group: EpGroup, rows: torch.Tensor, send_counts: Sequence[int]) -> None:
    if len(send_counts) != group.world_size:
        raise ValueError(f"exchange: {len(send_counts)} send_counts for {group.world_size} ranks")
    if rows.dim() != 2 or rows.shape[0] != sum(send_counts):
        raise ValueError(f"exchange: rows {tuple(rows.shape)} != send_counts total {sum(send_counts)}")


def _swap_counts(group: EpGroup, send_counts: Sequence[int]) -> list[int]:
    """How many rows each rank will send here."""
    send = torch.tensor(list(send_counts), dtype=torch.int64, device=group.device)
    recv = torch.empty_like(send)
    group.all_to_all(recv, send)
    return recv.tolist()


class VariableAllToAll:
    """Uneven all_to_all_single: exactly the rows needed."""

    def __init__(self, group: EpGroup) -> None:
        self.group = group
        self._bytes = 0

    @property
    def bytes_sent(self) -> int:
        return self._bytes

    def exchange(
        self, rows: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        _check(self.group, rows, send_counts)
        recv = list(recv_counts) if recv_counts is not None else _swap_counts(self.group, send_counts)
        out = rows.new_empty(sum(recv), rows.shape[1])
        self.group.all_to_all(out, rows.contiguous(), recv, list(send_counts))
        others = sum(send_counts) - send_counts[self.group.rank]
        self._bytes += others * rows.shape[1] * rows.element_size()
        return out, recv


class PaddedAllToAll:
    """Fixed-shape rounds of `capacity` rows per rank pair."""

    def __init__(self, group: EpGroup, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"PaddedAllToAll.capacity must be positive, got {capacity}")
        self.group, self.capacity = group, capacity
        self._bytes = 0

    @property
    def bytes_sent(self) -> int:
        return self._bytes

    def exchange(
        self, rows: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        _check(self.group, rows, send_counts)
        n, cap, width = self.group.world_size, self.capacity, rows.shape[1]
        recv = list(recv_counts) if recv_counts is not None else _swap_counts(self.group, send_counts)
        rounds = -(-self.group.max(max(send_counts, default=0)) // cap)
        starts = [sum(send_counts[:r]) for r in range(n)]
        pieces: list[list[torch.Tensor]] = [[] for _ in range(n)]
        for k in range(rounds):
            buf = rows.new_zeros(n * cap, width)
            for r in range(n):
                lo = min(k * cap, send_counts[r])
                hi = min((k + 1) * cap, send_counts[r])
                buf[r * cap : r * cap + hi - lo] = rows[starts[r] + lo : starts[r] + hi]
            got = torch.empty_like(buf)
            self.group.all_to_all(got, buf)
            self._bytes += (n - 1) * cap * width * rows.element_size()
            for r in range(n):
                take = max(0, min(cap, recv[r] - k * cap))
                pieces[r].append(got[r * cap : r * cap + take])
        flat = [p for r in range(n) for p in pieces[r]]
        out = torch.cat(flat) if flat else rows.new_empty(0, width)
        return out, recv
