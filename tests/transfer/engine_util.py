"""Helpers of the NIXL wiring tests: paged engines of the tiny model, stepping them, page bytes."""

from __future__ import annotations

import torch

from tandem.request import GenerationRequest
from tandem.tokenizer import ByteTokenizer
from workers.engine.engine import Engine, Role
from workers.engine.runner import LocalRunner
from workers.engine.scheduler import SchedulerConfig
from workers.kv.geometry import KvGeometry, PoolKind
from workers.kv.manager import KvCacheManager, KvCapacity
from workers.kv.presets import kv_shape
from workers.kv.space import PagedKvSpace
from workers.model.model import DeepseekV4
from workers.transfer.handoff import HandoffDescriptor
from workers.transfer.prefill_side import PrefillTransfer

CAP = KvCapacity(block_pages=24, window_pages=24, state_pages=6)
LENGTHS = (1, 127, 128, 129, 300, 1000)


def paged_engine(model: DeepseekV4, role: Role, name: str, prefix_caching: bool = False) -> Engine:
    geom = KvGeometry.of(kv_shape(model.cfg, with_mtp=False))
    kv = PagedKvSpace(KvCacheManager(geom, CAP, name), model.cfg.num_layers, model.dtype)
    sched = SchedulerConfig(prefix_caching=prefix_caching)
    return Engine(role, model.cfg, sched, kv, LocalRunner(model), ByteTokenizer())


def run(engine: Engine) -> dict[str, tuple[list[int], object]]:
    """Step until idle; per request its tokens and final summary."""
    out: dict[str, tuple[list[int], object]] = {}
    while engine.has_work:
        for d in engine.step().deltas:
            toks, _ = out.get(d.request_id, ([], None))
            out[d.request_id] = (toks + list(d.token_ids), d.summary)
    return out


def pages_bytes(geom: KvGeometry, length: int, cached_blocks: int = 0) -> int:
    """Bytes of the pages a pull of a `length`-token prompt moves: blocks from `cached_blocks`, the
    window pages covering the last W positions, the state page."""
    w = geom.window.tokens
    blocks = -(-length // 256) - cached_blocks
    windows = (length - 1) // w - max(length - w, 0) // w + 1
    return blocks * geom.page(PoolKind.BLOCK).nbytes + windows * geom.page(PoolKind.WINDOW).nbytes + \
        geom.page(PoolKind.STATE).nbytes


def prompt_of(n: int, seed: int) -> tuple[int, ...]:
    return tuple(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist())


def prefill_for_handoff(pre: Engine, ptx: PrefillTransfer, req: GenerationRequest) -> tuple[int, HandoffDescriptor]:
    """Prefill `req` on `pre` until its first token; that token and the descriptor a decode pulls."""
    pre.add(req)
    while True:
        for d in pre.step().deltas:
            if d.request_id == req.request_id and d.token_ids:
                seq = pre.handoff_seq(req.request_id)
                return d.token_ids[0], ptx.open(req.request_id, seq, len(req.prompt_ids))
