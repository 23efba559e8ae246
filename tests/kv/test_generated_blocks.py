"""Blocks filled by generated tokens: `PagedKvSpace.extend_tokens` hashes them (tandem.blocks, the
request's salt) once their last token is known, and the manager registers each once its KV is
written, so a pulled (held-only) prefix followed by computed blocks is resumable at the deepest
computed block end. Page bookkeeping only: the manager runs on meta-device pools, and the expected
hashes come from tandem.blocks over the whole token list, independently of the incremental path.
"""

from __future__ import annotations

import random

import pytest

from tandem.blocks import block_hashes
from workers.kv.events import KvStored
from workers.kv.geometry import KvGeometry
from workers.kv.manager import KvCacheManager, KvCapacity
from workers.kv.presets import kv_shape
from workers.kv.space import PagedKvSpace
from workers.model.presets import tiny

pytestmark = pytest.mark.kv


def _space() -> PagedKvSpace:
    cfg = tiny()
    m = KvCacheManager(KvGeometry.of(kv_shape(cfg, with_mtp=False)), KvCapacity(8, 8, 2), "d", device="meta")
    m.flush_events()
    return PagedKvSpace(m, cfg.num_layers)


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def _bodies(space: PagedKvSpace) -> list[object]:
    return [e.body for e in space.flush_events()]


def test_a_pulled_prefix_then_a_generated_block_is_resumable_at_the_generated_block_end() -> None:
    space = _space()
    m = space.manager
    prompt, answer = _tokens(600, 1), _tokens(300, 2)
    h = block_hashes(prompt + answer, salt="t")
    assert space.admit_prompt(1, prompt, 900, "t") == 0
    m.advance(1, 600, boundary_state_written=False, settle=False, pulled=True)  # the handoff's fill
    assert _bodies(space) == [KvStored(tuple(h[:2]), None, held_only=True)]
    space.extend_tokens(1, prompt + answer[:167], "t")  # 767 tokens: block 2 is not full yet
    assert m.known_blocks(1) == 2
    space.extend_tokens(1, prompt + answer[:168], "t")
    assert m.known_blocks(1) == 3 and not m.prefix.is_registered(h[2])  # its KV is not written yet
    m.advance(1, 767, boundary_state_written=False)
    assert not m.prefix.is_registered(h[2])
    m.advance(1, 768, boundary_state_written=True)  # the step that writes position 767 ends there
    assert _bodies(space) == [KvStored((h[2],), h[1])]  # computed here: resumable, not held only
    assert (m.prefix.held(h), m.prefix.lookup(h), m.prefix.lookup(h[:2])) == (3, 3, 0)
    space.extend_tokens(1, prompt + answer, "t")  # 900 tokens: still 3 full blocks, nothing new
    assert m.known_blocks(1) == 3 and _bodies(space) == []
    assert m.snapshot().block_hashes == (h[2],) and m.snapshot().held_only == tuple(h[:2])


def test_a_block_written_before_its_hash_was_known_registers_when_the_hash_comes() -> None:
    """A speculative step can accept drafts past a block end: the block registers (held, without a
    boundary: no step ended at it) as soon as its tokens are known."""
    space = _space()
    m = space.manager
    tokens = _tokens(520, 3)
    h = block_hashes(tokens)
    space.admit_prompt(2, tokens[:300], 900, None)
    m.advance(2, 300, boundary_state_written=False)
    m.advance(2, 520, boundary_state_written=False)  # accepted drafts wrote through 512
    assert m.prefix.held(h) == 1 and m.known_blocks(2) == 1
    space.extend_tokens(2, tokens, None)
    assert m.prefix.held(h) == 2 and m.prefix.lookup(h) == 0
    assert _bodies(space) == []  # computed here and no boundary: nothing to report
    with pytest.raises(KeyError, match="sequence 9 is not admitted"):
        space.extend_tokens(9, tokens, None)
