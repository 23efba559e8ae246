"""Descriptor lists for a pull: which byte ranges of the remote pools land where in the local ones.

A pull copies remote page src[i] into local page dst[i] for each pool. Consecutive pairs whose
source AND destination pages are both consecutive merge into one run, so a contiguous allocation
moves as one descriptor however long it is, and a fragmented one costs one descriptor per break.
Everything here is pure arithmetic on page ids; the NIXL calls live in transport.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from workers.kv.geometry import PoolKind


@dataclass(frozen=True)
class Region:
    """A registered pool buffer: `num_pages` pages of `page_bytes` from address `addr`."""

    pool: PoolKind
    addr: int
    page_bytes: int
    num_pages: int

    def check_pages(self, pages: Sequence[int], side: str) -> None:
        for p in pages:
            if not 0 <= p < self.num_pages:
                raise IndexError(f"{side} {self.pool.value} page {p} outside pool of {self.num_pages} pages")


@dataclass(frozen=True)
class Run:
    """`pages` consecutive pages from remote page `src` to local page `dst`."""

    src: int
    dst: int
    pages: int


def coalesce(src: Sequence[int], dst: Sequence[int]) -> tuple[Run, ...]:
    """Runs covering the pairs (src[i] -> dst[i]) in order; a pair extends the previous run when
    both its pages directly follow that run's last pages."""
    if len(src) != len(dst):
        raise ValueError(f"coalesce: {len(src)} source pages but {len(dst)} destination pages")
    runs: list[Run] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1].src + runs[-1].pages == s and runs[-1].dst + runs[-1].pages == d:
            runs[-1] = Run(runs[-1].src, runs[-1].dst, runs[-1].pages + 1)
        else:
            runs.append(Run(s, d, 1))
    return tuple(runs)


@dataclass(frozen=True)
class PoolPull:
    """One pool's part of a pull: the remote and local page ids, paired in order."""

    pool: PoolKind
    src: tuple[int, ...]
    dst: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.src) != len(self.dst):
            raise ValueError(
                f"PoolPull({self.pool.value}): {len(self.src)} source pages "
                f"but {len(self.dst)} destination pages"
            )


@dataclass(frozen=True)
class ReadPlan:
    """The coalesced runs of every pool of one pull, with the totals metrics report."""

    runs: tuple[tuple[PoolKind, tuple[Run, ...]], ...]
    nbytes: int
    num_descriptors: int

    @property
    def num_pages(self) -> int:
        return sum(r.pages for _, runs in self.runs for r in runs)


def plan_read(parts: Sequence[PoolPull], page_bytes: dict[PoolKind, int]) -> ReadPlan:
    """Coalesce each pool's pairs; pools with no pages are left out."""
    runs, nbytes, count = [], 0, 0
    for part in parts:
        if not part.src:
            continue
        pool_runs = coalesce(part.src, part.dst)
        runs.append((part.pool, pool_runs))
        nbytes += sum(r.pages for r in pool_runs) * page_bytes[part.pool]
        count += len(pool_runs)
    return ReadPlan(tuple(runs), nbytes, count)


def descriptor_arrays(
    plan: ReadPlan, local: dict[PoolKind, Region], remote: dict[PoolKind, Region]
) -> tuple[np.ndarray, np.ndarray]:
    """(local, remote) uint64 [n, 3] arrays of (address, length, device 0), one row per run, in the
    same order: what nixl's get_xfer_descs takes for DRAM."""
    rows_l, rows_r = [], []
    for pool, runs in plan.runs:
        lr, rr = local[pool], remote[pool]
        if lr.page_bytes != rr.page_bytes:
            raise ValueError(
                f"{pool.value} page size differs: local {lr.page_bytes} B, remote {rr.page_bytes} B"
            )
        for r in runs:
            lr.check_pages((r.dst, r.dst + r.pages - 1), "local")
            rr.check_pages((r.src, r.src + r.pages - 1), "remote")
            n = r.pages * lr.page_bytes
            rows_l.append((lr.addr + r.dst * lr.page_bytes, n, 0))
            rows_r.append((rr.addr + r.src * rr.page_bytes, n, 0))
    return np.array(rows_l, dtype=np.uint64).reshape(-1, 3), np.array(rows_r, dtype=np.uint64).reshape(-1, 3)


def page_indices(
    plan: ReadPlan, local_base: dict[PoolKind, int], remote_base: dict[PoolKind, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(local, remote) int32 index arrays into per-page prepped lists that hold each side's pools'
    pages back to back (pool p's page i at index base[p] + i): the prepped-list form of the plan."""
    loc, rem = [], []
    for pool, runs in plan.runs:
        lb, rb = local_base[pool], remote_base[pool]
        for r in runs:
            loc.extend(range(lb + r.dst, lb + r.dst + r.pages))
            rem.extend(range(rb + r.src, rb + r.src + r.pages))
    return np.array(loc, dtype=np.int32), np.array(rem, dtype=np.int32)


def split_plan(plan: ReadPlan, parts: int, page_bytes: dict[PoolKind, int]) -> tuple[ReadPlan, ...]:
    """Cut `plan` into at most `parts` plans of about equal bytes, for READs on parallel lanes.

    Pages keep their order; a page goes to the part its byte midpoint falls in, so the parts are
    consecutive slices and, concatenated, move exactly the pages of `plan`. Empty parts are left out.
    """
    if parts < 1:
        raise ValueError(f"split_plan: parts must be >= 1, got {parts}")
    if parts == 1 or plan.nbytes == 0:
        return (plan,)
    slices: list[list[tuple[PoolKind, int, int]]] = [[] for _ in range(parts)]
    offset = 0
    for pool, runs in plan.runs:
        size = page_bytes[pool]
        for run in runs:
            for i in range(run.pages):
                part = min(parts - 1, (2 * offset + size) * parts // (2 * plan.nbytes))
                slices[part].append((pool, run.src + i, run.dst + i))
                offset += size
    out = []
    for pages in slices:
        if pages:
            pools = list(dict.fromkeys(pool for pool, _, _ in pages))
            pulls = [
                PoolPull(p, tuple(s for q, s, _ in pages if q is p), tuple(d for q, _, d in pages if q is p))
                for p in pools
            ]
            out.append(plan_read(pulls, page_bytes))
    return tuple(out)
