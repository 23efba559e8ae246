"""Body of a speculating EP test rank: a plain process started by ep_procs.spawn (spawn context)."""

from __future__ import annotations

from pathlib import Path

import torch
from ep_procs import _group, run_lockstep

from tandem.request import GenerationRequest
from tandem.tokenizer import ByteTokenizer
from workers.engine.engine import Engine, Role
from workers.engine.kv import BlockSpace, BlockSpaceConfig
from workers.engine.scheduler import SchedulerConfig
from workers.engine.speculate import SpeculationConfig, Speculator
from workers.ep.dispatch import VariableAllToAll
from workers.ep.runner import EpRunner
from workers.model.config import load_config
from workers.model.loader import load

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "models" / "tiny-demo"


def speculating_rank(rank: int, world: int, port: int, queue, reqs: list[list[GenerationRequest]], k: int
                     ) -> None:
    """Serve reqs[rank] with MTP speculation (k drafts) on rank `rank` of an EP instance of the demo
    checkpoint, in lockstep; report (tokens per request, steps, drafted, accepted)."""
    try:
        group = _group(rank, world, port)
        experts = group.local_experts(load_config(DEMO).n_routed_experts)
        model = load(DEMO, dtype=torch.float32, quant_sim=False, local_experts=experts, progress=False)
        runner = EpRunner(model, group, VariableAllToAll(group))
        kv = BlockSpace(BlockSpaceConfig(64, 256), model.cfg.window)
        spec = Speculator(model, SpeculationConfig(k), lockstep=True)
        engine = Engine(Role.AGGREGATED, model.cfg, SchedulerConfig(max_batched_tokens=128, prefill_chunk=64),
                        kv, runner, ByteTokenizer(), spec)
        tokens, steps = run_lockstep(engine, group, reqs[rank])
        st = engine.stats()
        queue.put((rank, (tokens, steps, st.drafted_tokens, st.accepted_tokens)))
        group.close()
    except BaseException as exc:  # reported to the parent, which re-raises it
        queue.put((rank, exc))
