"""What the scheduler needs of KV memory, and a block-counting implementation of it.

`KvSpace` is the narrow protocol: admit a sequence for its first tokens, grow it a step at a time,
free it, and report blocks used / free, prefix hit rate and KV events. `cache` is the `ModelCache`
the model reads and writes. `BlockSpace` counts fixed-size blocks of token positions over a
`ContiguousCache`, growing each sequence lazily and caching no prefixes, so running out of blocks
mid-decode really happens and the scheduler's preemption is exercised. The paged pools of
workers/kv/ (KvCacheManager + PagedModelCache) are meant to satisfy the same protocol through an
adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from workers.kv.events import KvEvent
from workers.model.cache import ContiguousCache, ModelCache


class KvExhausted(RuntimeError):
    """A grow or admit asked for more blocks than are free: the scheduler should have checked."""


class KvSpace(Protocol):
    """Block accounting and the model cache for one rank."""

    @property
    def cache(self) -> ModelCache: ...
    @property
    def blocks_used(self) -> int: ...
    @property
    def blocks_free(self) -> int: ...
    @property
    def prefix_hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache / prompt tokens admitted, since start."""
        ...
    def flush_events(self) -> tuple[KvEvent, ...]:
        """KV events (prefix cache stored / removed) since the last flush, oldest first."""
        ...
    @property
    def max_seq_tokens(self) -> int:
        """Positions one sequence could ever hold (with every block free): longer requests never fit."""
        ...
    def admit_prompt(self, seq: int, prompt_ids: Sequence[int], max_len: int, salt: str | bytes | None
                     ) -> int:
        """Admit a new (or preempted) sequence with its tokens so far; returns how many of them the
        prefix cache already holds (the engine starts computing there; always < len(prompt_ids)).
        Called after `can_hold(seq, max_len)` said yes."""
        ...
    def extend_tokens(self, seq: int, token_ids: Sequence[int], salt: str | bytes | None) -> None:
        """`token_ids`: admitted `seq`'s tokens so far (prompt + generated). The full blocks among
        them become cacheable prefix blocks once their KV is written (a follow-up turn that repeats
        them resumes after them)."""
        ...
    def can_hold(self, seq: int, num_tokens: int) -> bool:
        """Whether `seq` (admitted or not) could hold `num_tokens` positions without evicting anyone."""
        ...
    def hold(self, seq: int, num_tokens: int) -> None:
        """Make `seq` hold at least `num_tokens` positions (admits it on first use)."""
        ...
    def free(self, seq: int) -> None:
        """Release every block and all model state of `seq` at once."""
        ...


@dataclass(frozen=True)
class BlockSpaceConfig:
    """num_blocks blocks of block_size token positions each."""

    num_blocks: int
    block_size: int = 256

    def __post_init__(self) -> None:
        if self.num_blocks <= 0:
            raise ValueError(f"BlockSpaceConfig.num_blocks must be positive, got {self.num_blocks}")
        if self.block_size <= 0:
            raise ValueError(f"BlockSpaceConfig.block_size must be positive, got {self.block_size}")


class BlockSpace:
    """KvSpace over a ContiguousCache: ceil(positions / block_size) blocks per sequence."""

    def __init__(self, config: BlockSpaceConfig, window: int) -> None:
        self.config = config
        self._cache = ContiguousCache(window)
        self._held: dict[int, int] = {}  # seq -> blocks
        self._used = 0

    @property
    def cache(self) -> ContiguousCache:
        return self._cache

    @property
    def blocks_used(self) -> int:
        return self._used

    @property
    def blocks_free(self) -> int:
        return self.config.num_blocks - self._used

    @property
    def max_seq_tokens(self) -> int:
        return self.config.num_blocks * self.config.block_size

    @property
    def prefix_hit_rate(self) -> float:
        return 0.0  # no prefix cache here: nothing is ever served from one

    def flush_events(self) -> tuple[KvEvent, ...]:
        return ()  # no prefix cache, so nothing to report

    def blocks_of(self, seq: int) -> int:
        """Blocks `seq` holds now (0 when not admitted)."""
        return self._held.get(seq, 0)

    def _need(self, seq: int, num_tokens: int) -> int:
        want = -(-num_tokens // self.config.block_size)
        return max(0, want - self._held.get(seq, 0))

    def admit_prompt(self, seq: int, prompt_ids: Sequence[int], max_len: int, salt: str | bytes | None
                     ) -> int:
        if seq in self._held:
            raise ValueError(f"admit_prompt: sequence {seq} is already admitted")
        return 0  # no prefix cache; blocks are taken by `hold` as the sequence grows

    def extend_tokens(self, seq: int, token_ids: Sequence[int], salt: str | bytes | None) -> None:
        return None  # no prefix cache: no block is ever cached

    def can_hold(self, seq: int, num_tokens: int) -> bool:
        return self._need(seq, num_tokens) <= self.blocks_free

    def hold(self, seq: int, num_tokens: int) -> None:
        need = self._need(seq, num_tokens)
        if need > self.blocks_free:
            raise KvExhausted(
                f"sequence {seq} needs {need} more blocks for {num_tokens} tokens; {self.blocks_free} free"
            )
        self._held[seq] = self._held.get(seq, 0) + need
        self._used += need

    def free(self, seq: int) -> None:
        self._used -= self._held.pop(seq, 0)
        self._cache.free(seq)
