"""HCA running softmax accumulators (workers/model/running_pool.py) against float64 batch pooling.

Folding a block's rows in any chunking (1-token chunks included) must give the softmax pooling of
all of them at once; the HCA compressor over chunked prefill and decode must give the one-shot
entries; a recorded step's trail must be the states of separate 1-position steps (up to the
last bit a projection over 5 rows rounds differently from one over 1 row).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from workers.model import running_pool
from workers.model.cache import RunningPool
from workers.model.compressor import Compressor
from workers.model.rope import Rope

pytestmark = pytest.mark.model

M, WIDTH = 128, 48


def batch_pool(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """The independent reference: per-dimension softmax over all rows, in float64."""
    return (kv.double() * score.double().softmax(dim=0)).sum(dim=0)


def random_chunks(g: torch.Generator, total: int, ones: int) -> list[int]:
    """A random split of `total` with at least `ones` 1-token chunks."""
    sizes = [1] * ones
    left = total - ones
    while left:
        n = int(torch.randint(1, min(left, 40) + 1, (1,), generator=g))
        sizes.append(n)
        left -= n
    return [sizes[i] for i in torch.randperm(len(sizes), generator=g).tolist()]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-13), (torch.float32, 2e-6)])
def test_folding_any_chunking_of_a_block_equals_batch_softmax(seed: int, dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(M, WIDTH, generator=g, dtype=torch.float64) * 3
    score = torch.randn(M, WIDTH, generator=g, dtype=torch.float64) * (1 + 4 * seed)  # up to sharp softmaxes
    want = batch_pool(kv, score)
    pool, pos = RunningPool.empty(WIDTH, dtype=dtype), 0
    for n in random_chunks(g, M, ones=5):
        pool = running_pool.fold(pool, kv[pos : pos + n].to(dtype), score[pos : pos + n].to(dtype))
        pos += n
        assert pool.count == pos
        # a prefix of the block is the batch pooling of that prefix too
        part = batch_pool(kv[:pos].to(dtype), score[:pos].to(dtype))
        assert float((running_pool.value(pool).double() - part).abs().max()) <= tol * float(part.abs().max() + 1)
    got = running_pool.value(pool).double()
    assert float((got - want).abs().max()) <= tol * float(want.abs().max() + 1)
    assert pool.max.dtype == dtype and torch.equal(pool.max, score.to(dtype).max(dim=0).values)


def test_an_empty_pool_has_no_value_and_bad_rows_are_named() -> None:
    pool = RunningPool.empty(WIDTH)
    with pytest.raises(ValueError, match="empty"):
        running_pool.value(pool)
    with pytest.raises(ValueError, match=r"\[n, 48\]"):
        running_pool.fold(pool, torch.zeros(2, 47), torch.zeros(2, 47))


def hca(seed: int) -> tuple[Compressor, Rope]:
    comp = Compressor(16, 32, M, overlap=False, eps=1e-6).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in comp.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
    theta = 10000.0
    return comp, Rope(torch.tensor([theta ** (-2 * i / 8) for i in range(4)], dtype=torch.float32))


@pytest.mark.parametrize("seed", range(3))
def test_hca_compressor_chunked_and_decoded_equals_one_shot(seed: int) -> None:
    """Chunks start mid-block, span several blocks, end mid-block; a decode tail adds 1 token at a time."""
    comp, rope = hca(seed)
    g = torch.Generator().manual_seed(100 + seed)
    t = 3 * M + 37
    x = torch.randn(t, 16, generator=g, dtype=torch.float64)
    want, _ = comp(x, comp.empty_state("cpu", torch.float64), rope)
    sizes = [5, 2 * M + 40] + random_chunks(g, t - 45 - 2 * M - 30, ones=3) + [1] * 30
    state, pos, parts = comp.empty_state("cpu", torch.float64), 0, []
    for n in sizes:
        new, state = comp(x[pos : pos + n], state, rope)
        parts.append(new)
        pos += n
        assert state.start == pos // M * M and state.pool is not None and state.pool.count == pos % M
        assert state.kv.shape[0] == 0  # no raw rows are kept
    torch.testing.assert_close(torch.cat(parts), want, rtol=0, atol=1e-12)
    assert want.shape[0] == 3


@torch.no_grad()
def test_recorded_step_trail_is_the_states_of_one_position_steps() -> None:
    comp, rope = hca(7)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(M + 3, 16, generator=g, dtype=torch.float64)
    _, state = comp(x[: M - 2], comp.empty_state("cpu", torch.float64), rope)
    new, after = comp(x[M - 2 :], dataclasses.replace(state, record=True), rope)  # crosses the block end
    assert len(after.trail) == 5 and not after.record and after.trail[-1].end == after.end == M + 3
    single, entries = state, []
    for i in range(M - 2, M + 3):
        e, single = comp(x[i : i + 1], single, rope)
        entries.append(e)
        rec = after.trail[i - (M - 2)]
        assert rec.start == single.start and rec.pool is not None and single.pool is not None
        assert rec.pool.count == single.pool.count and rec.trail == ()
        for a, b in ((rec.pool.max, single.pool.max), (rec.pool.sum, single.pool.sum),
                     (rec.pool.wsum, single.pool.wsum)):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    assert new.shape[0] == 1
    torch.testing.assert_close(new, torch.cat(entries), rtol=1e-12, atol=0)
