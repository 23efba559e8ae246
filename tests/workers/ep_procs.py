"""Bodies of the EP test ranks: plain processes started with torch.multiprocessing (spawn)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from tandem.request import GenerationRequest
from tandem.tokenizer import ByteTokenizer
from workers.engine.engine import Engine, Role
from workers.engine.kv import BlockSpace, BlockSpaceConfig
from workers.engine.scheduler import SchedulerConfig
from workers.ep.dispatch import PaddedAllToAll, VariableAllToAll
from workers.ep.group import EpConfig, EpGroup
from workers.ep.runner import EpRunner, lockstep_step
from workers.model.init import init_random
from workers.model.model import DeepseekV4
from workers.model.presets import tiny


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> list:
    """Run fn(rank, world, port, queue, *args) on `world` processes; their results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=fn, args=(r, world, port, queue, *args)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, value = queue.get(timeout=240)
            if isinstance(value, BaseException):
                raise value
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def _group(rank: int, world: int, port: int) -> EpGroup:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    return EpGroup(EpConfig(rank, world, master_port=port, timeout_s=60))


def exchange_rank(rank: int, world: int, port: int, queue, capacity: int) -> None:
    """Each rank sends (src, dst, i) rows; returns what it received and the bytes it counted."""
    try:
        group = _group(rank, world, port)
        disp = VariableAllToAll(group) if capacity == 0 else PaddedAllToAll(group, capacity)
        counts = [(rank + 2 * dst + 1) % 5 for dst in range(world)]
        rows = torch.tensor([[rank, dst, i] for dst in range(world) for i in range(counts[dst])], dtype=torch.float32)
        got, recv = disp.exchange(rows.reshape(-1, 3), counts)
        back, _ = disp.exchange(got * 10, recv, counts)
        queue.put((rank, (got.tolist(), recv, back.tolist(), rows.tolist(), disp.bytes_sent)))
        group.close()
    except BaseException as exc:  # reported to the parent, which re-raises it
        queue.put((rank, exc))


@dataclass(frozen=True)
class EpRun:
    tokens: dict[str, list[int]]
    expert_params: int
    total_expert_params: int
    bytes_dispatched: int
    steps: int



def run_lockstep(engine: Engine, group: EpGroup, reqs: list[GenerationRequest]
                 ) -> tuple[dict[str, list[int]], int]:
    """Add `reqs` and step the rank in lockstep with its group until every rank is idle: each
    request's tokens, and the steps taken."""
    for r in reqs:
        engine.add(r)
    tokens: dict[str, list[int]] = {}
    steps = 0
    while (out := lockstep_step(engine, group)) is not None:
        steps += 1
        for d in out.deltas:
            tokens.setdefault(d.request_id, []).extend(d.token_ids)
    return tokens, steps

def shard_model(rank_experts: range | None) -> DeepseekV4:
    """The tiny model (seed 0) holding only `rank_experts` (all when None)."""
    full = init_random(DeepseekV4(tiny(), quant_sim=False, with_mtp=False), seed=0)
    if rank_experts is None:
        return full.eval()
    shard = DeepseekV4(tiny(), quant_sim=False, with_mtp=False, local_experts=rank_experts)
    mine = shard.state_dict()
    shard.load_state_dict({k: v for k, v in full.state_dict().items() if k in mine}, strict=True)
    return shard.eval()


def expert_param_count(model: DeepseekV4) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)


def engine_rank(rank: int, world: int, port: int, queue, reqs: list[list[GenerationRequest]], capacity: int
                ) -> None:
    """Serve reqs[rank] on rank `rank` of an EP instance in lockstep; report tokens and counters."""
    try:
        group = _group(rank, world, port)
        cfg = tiny()
        model = shard_model(group.local_experts(cfg.n_routed_experts))
        total = expert_param_count(shard_model(None))
        mine = expert_param_count(model)
        disp = VariableAllToAll(group) if capacity == 0 else PaddedAllToAll(group, capacity)
        runner = EpRunner(model, group, disp)
        kv = BlockSpace(BlockSpaceConfig(64, 256), cfg.window)
        engine = Engine(Role.AGGREGATED, cfg, SchedulerConfig(max_batched_tokens=128, prefill_chunk=64), kv,
                        runner, ByteTokenizer())
        tokens, steps = run_lockstep(engine, group, reqs[rank])
        queue.put((rank, EpRun(tokens, mine, total, runner.bytes_dispatched, steps)))
        group.close()
    except BaseException as exc:
        queue.put((rank, exc))
