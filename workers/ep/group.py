"""An expert-parallel group: N ranks of one worker instance over torch.distributed.

Each rank owns a contiguous 1/N slice of the routed experts (expert e lives on rank e // (E / N));
attention is data parallel (each rank owns its own requests and KV). The group wraps the
process group it creates; nothing is kept in module globals. Creation times out instead of hanging.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class Backend(enum.Enum):
    GLOO = "gloo"  # CPU (GLOO_SOCKET_IFNAME=lo in tests)
    NCCL = "nccl"  # GPU


@dataclass(frozen=True)
class EpConfig:
    """Where rank `rank` of `world_size` meets the others: a TCP store at master_addr:master_port."""

    rank: int
    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    backend: Backend = Backend.GLOO
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.world_size <= 0:
            raise ValueError(f"EpConfig.world_size must be positive, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"EpConfig.rank {self.rank} outside 0..{self.world_size - 1}")
        if self.timeout_s <= 0:
            raise ValueError(f"EpConfig.timeout_s must be positive, got {self.timeout_s}")


def expert_slice(n_experts: int, world_size: int, rank: int) -> range:
    """The routed experts rank `rank` holds: exactly n_experts / world_size of them."""
    if n_experts % world_size:
        raise ValueError(f"{n_experts} routed experts do not split evenly over {world_size} EP ranks")
    per = n_experts // world_size
    return range(rank * per, (rank + 1) * per)


class EpGroup:
    """The process group of one EP instance (see the module docstring). world_size 1 needs none."""

    def __init__(self, config: EpConfig) -> None:
        self.config = config
        self._pg: dist.ProcessGroup | None = None
        if config.world_size > 1:
            if dist.is_initialized():
                raise RuntimeError("EpGroup: this process already has a default process group")
            dist.init_process_group(
                backend=config.backend.value,
                init_method=f"tcp://{config.master_addr}:{config.master_port}",
                rank=config.rank,
                world_size=config.world_size,
                timeout=timedelta(seconds=config.timeout_s),
            )
            self._pg = dist.group.WORLD

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def device(self) -> torch.device:
        if self.config.backend is Backend.NCCL:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def local_experts(self, n_experts: int) -> range:
        return expert_slice(n_experts, self.world_size, self.rank)

    def owner(self, expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
        """Rank owning each expert id (same shape)."""
        return expert_ids // (n_experts // self.world_size)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None = None,
                   in_splits: list[int] | None = None) -> None:
        """all_to_all_single over dim 0 (equal splits when none are given)."""
        if self._pg is None:
            out.copy_(inp)
            return
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=self._pg)

    def any(self, flag: bool) -> bool:
        """True on every rank iff `flag` is true on some rank (the lockstep vote)."""
        if self._pg is None:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._pg)
        return bool(t.item())

    def max(self, value: int) -> int:
        """The largest `value` over the ranks."""
        if self._pg is None:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._pg)
        return int(t.item())

    def close(self) -> None:
        if self._pg is not None:
            dist.destroy_process_group()
            self._pg = None
