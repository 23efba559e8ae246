"""PagedKvSpace: the engine's KvSpace (workers/engine/kv.py) on the paged pools.

The engine's scheduler grows a sequence a step at a time (`can_hold` / `hold`) and preempts when
memory runs short; here `hold` admits a sequence on first use (its window and state pages
reserved, its block pages up to the positions asked) and `extend`s its reservation as it grows,
so a held sequence never runs out of pages. `admit_prompt` is the prefix-cached way in: called
before the first `hold` with the prompt's token ids, it returns how many prompt tokens the prefix
cache already holds (the engine then starts the request there); `extend_tokens` hashes the blocks
generated tokens fill, so a follow-up turn can resume after them. Events and stats come from the
manager; blocks are the BLOCK pool's pages (cached, unreferenced ones count as free).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tandem.blocks import block_hashes, extend_block_hashes
from workers.kv.events import KvEvent
from workers.kv.geometry import PoolKind
from workers.kv.manager import KvCacheManager
from workers.kv.paged_cache import PagedModelCache


class PagedKvSpace:
    """KvSpace over `manager`; see the module docstring."""

    def __init__(
        self, manager: KvCacheManager, num_main_layers: int, dtype: torch.dtype = torch.float32
    ) -> None:
        self.manager = manager
        self._cache = PagedModelCache(manager, num_main_layers, dtype)
        self._prompt_tokens = 0
        self._hit_tokens = 0

    @property
    def cache(self) -> PagedModelCache:
        return self._cache

    @property
    def blocks_used(self) -> int:
        a = self.manager.allocators[PoolKind.BLOCK]
        return a.num_pages - a.num_free - self.manager.prefix.evictable_blocks

    @property
    def blocks_free(self) -> int:
        return self.manager.allocators[PoolKind.BLOCK].num_free + self.manager.prefix.evictable_blocks

    @property
    def max_seq_tokens(self) -> int:
        return self.manager.allocators[PoolKind.BLOCK].num_pages * self.manager.block_size

    @property
    def prefix_hit_rate(self) -> float:
        return self._hit_tokens / self._prompt_tokens if self._prompt_tokens else 0.0

    def flush_events(self) -> tuple[KvEvent, ...]:
        return self.manager.flush_events().events

    def admit_prompt(
        self, seq: int, prompt_ids: Sequence[int], max_len: int, salt: str | bytes | None = None
    ) -> int:
        """Admit `seq` with its prompt (prefix cache looked up); returns the prompt tokens already
        held. Raises AdmissionRefused when it cannot be held to max_len."""
        adm = self._cache.admit(seq, prompt_ids, max_len, salt)
        self._prompt_tokens += len(prompt_ids)
        self._hit_tokens += adm.hit_tokens
        return adm.hit_tokens

    def extend_tokens(self, seq: int, token_ids: Sequence[int], salt: str | bytes | None = None) -> None:
        """`token_ids`: the admitted sequence's tokens so far (prompt + generated). Its full blocks
        past the hashes known get theirs (tandem.blocks, with `salt`), so the blocks its generated
        tokens fill are cached and resumable like prompt blocks; hashing runs once per new block."""
        m = self.manager
        bs = m.block_size
        known, full = m.known_blocks(seq), len(token_ids) // bs
        if full > known:
            new = list(token_ids[known * bs : full * bs])  # only the new blocks are hashed
            m.add_hashes(seq, extend_block_hashes(m.last_hash(seq), new, block_size=bs) if known
                         else block_hashes(new, salt=salt, block_size=bs))

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.manager.block_size)

    def can_hold(self, seq: int, num_tokens: int) -> bool:
        m = self.manager
        if not m.is_admitted(seq):
            return m.can_admit([], 0, num_tokens)
        extra = self._blocks(num_tokens) - self._blocks(m.max_len(seq))
        return extra <= 0 or extra <= m.available(PoolKind.BLOCK)

    def hold(self, seq: int, num_tokens: int) -> None:
        if not self.manager.is_admitted(seq):
            self._cache.admit(seq, [], num_tokens)
        else:
            self.manager.extend(seq, num_tokens)

    def free(self, seq: int) -> None:
        if self.manager.is_admitted(seq):
            self._cache.free(seq)
