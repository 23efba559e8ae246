"""What the prefill and decode actors share: their frozen config, building a rank's engine, and
the conversions to the wire types of `tandem` (stats, KV events, handoff descriptors).

The controller builds a `WorkerConfig` per rank from the deployment spec (workers never see the
pydantic spec). One engine per rank: with `ep` set, the rank joins its instance's EP group first
(a collective: every rank of the instance must be started together).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tandem.blocks import block_hashes
from tandem.request import GenerationRequest
from tandem.tokenizer import Tokenizer, load_tokenizer
from tandem.v1 import worker_pb2
from workers.engine.engine import Engine, EngineStats, Role
from workers.engine.kv import BlockSpace, BlockSpaceConfig, KvSpace
from workers.engine.runner import LocalRunner, ModelRunner
from workers.engine.scheduler import SchedulerConfig
from workers.engine.speculate import SpeculationConfig, Speculator
from workers.ep.dispatch import Dispatcher, PaddedAllToAll, VariableAllToAll
from workers.ep.group import EpConfig, EpGroup
from workers.ep.runner import EpRunner
from workers.faults import FaultConfig
from workers.kv.events import KvCleared, KvEvent, KvRemoved, KvStored
from workers.kv.geometry import KvGeometry
from workers.kv.manager import KvCacheManager, KvCapacity
from workers.kv.presets import kv_shape
from workers.kv.space import PagedKvSpace
from workers.model.config import load_config
from workers.model.init import init_random
from workers.model.loader import load
from workers.model.model import DeepseekV4
from workers.model.presets import preset

_ROLE_PB = {
    Role.PREFILL: worker_pb2.ROLE_PREFILL,
    Role.DECODE: worker_pb2.ROLE_DECODE,
    Role.AGGREGATED: worker_pb2.ROLE_AGGREGATED,
}


class DispatchKind(enum.Enum):
    VARIABLE = "variable"  # uneven all-to-all: fewest bytes
    PADDED = "padded"  # fixed capacity per rank pair: fixed shapes (CUDA graphs)


class HandoffPath(enum.Enum):
    """How a prompt's KV goes from a prefill rank to a decode rank."""

    NIXL = "nixl"  # the decode pulls the prefill's pages over NIXL (needs PagedPoolsConfig)
    # Tests only: the prefill exports its state as tensors and the decode takes them through
    # Ray's object store (the contiguous BlockSpace cache has no pages to pull).
    RAY_OBJECT_STORE = "ray_object_store"


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint directory, or (no checkpoint) a named preset with deterministic random weights."""

    checkpoint: str | None = None
    preset: str = "tiny"
    seed: int = 0
    quant_sim: bool = False
    bf16: bool = False

    @property
    def n_routed_experts(self) -> int:
        if self.checkpoint is not None:
            return load_config(Path(self.checkpoint)).n_routed_experts
        return preset(self.preset).n_routed_experts

    def build(self, local_experts: range | None, with_mtp: bool = False) -> DeepseekV4:
        """This rank's model: all routed experts, or only `local_experts`. A checkpoint brings its
        MTP layer when it has one; a preset gets a (random) one only `with_mtp` (speculation)."""
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        if self.checkpoint is not None:
            return load(self.checkpoint, dtype=dtype, quant_sim=self.quant_sim, local_experts=local_experts,
                        progress=False)
        cfg, sim = preset(self.preset), self.quant_sim
        full = init_random(DeepseekV4(cfg, quant_sim=sim, with_mtp=with_mtp), seed=self.seed).to(dtype)
        if local_experts is None:
            return full.eval()
        shard = DeepseekV4(cfg, quant_sim=sim, with_mtp=with_mtp, local_experts=local_experts).to(dtype)
        keep = shard.state_dict()
        shard.load_state_dict({k: v for k, v in full.state_dict().items() if k in keep}, strict=True)
        return shard.eval()


@dataclass(frozen=True)
class PagedPoolsConfig:
    """The paged pools of workers/kv (prefix cache, KV events): pages per pool."""

    block_pages: int
    window_pages: int
    state_pages: int


@dataclass(frozen=True)
class WorkerConfig:
    """One rank of one worker instance."""

    instance: str
    role: Role
    rank: int = 0
    model: ModelSource = field(default_factory=ModelSource)
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv: BlockSpaceConfig | PagedPoolsConfig = field(default_factory=lambda: BlockSpaceConfig(num_blocks=256))
    ep: EpConfig | None = None
    dispatch: DispatchKind = DispatchKind.VARIABLE
    dispatch_capacity: int = 256
    handoff_lease_s: float = 30.0
    handoff: HandoffPath = HandoffPath.NIXL
    handoff_timeout_s: float = 30.0  # a claimed handoff's pin (prefill) and a pull's budget (decode)
    nvlink_domain: str = "local"
    torch_threads: int = 1
    faults: FaultConfig = field(default_factory=FaultConfig)  # tests only; none by default
    # MTP speculative decoding (decode ranks draft; prefill ranks of the same deployment keep the
    # MTP state their handoffs carry). Needs a model with an MTP layer.
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)

    def __post_init__(self) -> None:
        if self.ep is not None and self.ep.rank != self.rank:
            raise ValueError(f"WorkerConfig.rank {self.rank} != ep.rank {self.ep.rank}")
        if self.handoff_lease_s <= 0:
            raise ValueError(f"WorkerConfig.handoff_lease_s must be positive, got {self.handoff_lease_s}")
        if self.handoff_timeout_s <= 0:
            raise ValueError(f"WorkerConfig.handoff_timeout_s must be positive, got {self.handoff_timeout_s}")
        # Every role: an aggregated rank's actor can still be handed prefilled requests.
        if self.handoff is HandoffPath.NIXL and not isinstance(self.kv, PagedPoolsConfig):
            raise ValueError(f"WorkerConfig({self.name}).handoff is NIXL, which pulls pages of the paged "
                             f"pools: kv must be PagedPoolsConfig, got {type(self.kv).__name__} (or set "
                             f"handoff=HandoffPath.RAY_OBJECT_STORE, a test mode)")

    @property
    def name(self) -> str:
        """"instance/rN", as GenerateChunk names workers."""
        return f"{self.instance}/r{self.rank}"


def actor_name(instance: str, rank: int) -> str:
    """The Ray actor name of a rank, so peers can find it (e.g. a decode pulling a handoff)."""
    return f"tandem/{instance}/r{rank}"


@dataclass(frozen=True)
class BuiltRank:
    engine: Engine
    group: EpGroup | None
    runner: ModelRunner
    tokenizer: Tokenizer
    dispatcher: Dispatcher | None  # None without expert parallelism


def build_rank(cfg: WorkerConfig) -> BuiltRank:
    """Join the EP group (if any), build the model shard, the KV space and the engine."""
    torch.set_num_threads(cfg.torch_threads)
    group = EpGroup(cfg.ep) if cfg.ep is not None else None
    experts = group.local_experts(cfg.model.n_routed_experts) if group is not None else None
    model = cfg.model.build(experts, with_mtp=cfg.speculation.enabled)
    runner: ModelRunner
    disp: Dispatcher | None = None
    if group is None:
        runner = LocalRunner(model)
    else:
        disp = (VariableAllToAll(group) if cfg.dispatch is DispatchKind.VARIABLE
                else PaddedAllToAll(group, cfg.dispatch_capacity))
        runner = EpRunner(model, group, disp)
    tokenizer = load_tokenizer(cfg.model.checkpoint)
    kv = _kv_space(cfg, model)
    speculator = (Speculator(model, cfg.speculation, lockstep=group is not None) if cfg.speculation.enabled
                  else None)
    engine = Engine(cfg.role, model.cfg, cfg.sched, kv, runner, tokenizer, speculator)
    return BuiltRank(engine, group, runner, tokenizer, disp)


def _kv_space(cfg: WorkerConfig, model: DeepseekV4) -> KvSpace:
    if isinstance(cfg.kv, BlockSpaceConfig):
        return BlockSpace(cfg.kv, model.cfg.window)
    spec = cfg.speculation.enabled  # the MTP layer's window and hidden row live in the pages too
    geom = KvGeometry.of(kv_shape(model.cfg, with_mtp=spec, mtp_hidden=spec))
    caps = KvCapacity(cfg.kv.block_pages, cfg.kv.window_pages, cfg.kv.state_pages)
    return PagedKvSpace(KvCacheManager(geom, caps, cfg.name), model.cfg.num_layers, model.dtype)


def stats_proto(cfg: WorkerConfig, st: EngineStats, prefill_tok_s: float, decode_tok_s: float,
                draining: bool) -> worker_pb2.WorkerStats:
    """tandem.v1.WorkerStats of one rank."""
    return worker_pb2.WorkerStats(
        worker=worker_pb2.WorkerId(instance=cfg.instance, dp_rank=cfg.rank), role=_ROLE_PB[cfg.role],
        queued_requests=st.queued, queued_prefill_tokens=st.queued_prefill_tokens,
        running_requests=st.running, kv_blocks_used=st.blocks_used, kv_blocks_free=st.blocks_free,
        prefix_hit_rate=st.prefix_hit_rate, prefill_tok_s=prefill_tok_s, decode_tok_s=decode_tok_s,
        draining=draining, nvlink_domain=cfg.nvlink_domain,
    )


def handoff_descriptor(cfg: WorkerConfig, request: GenerationRequest, first_token: int, epoch: int
                       ) -> worker_pb2.HandoffDescriptor:
    """The descriptor a decode uses to find and pull a held prompt state. In-process handoffs
    (Ray object store) leave `agent_name` and `pools` empty; the NIXL path fills them."""
    hashes = request.block_hashes or tuple(block_hashes(request.prompt_ids, salt=request.cache_salt))
    return worker_pb2.HandoffDescriptor(
        request_id=request.request_id, prefill=worker_pb2.WorkerId(instance=cfg.instance, dp_rank=cfg.rank),
        epoch=epoch, prompt_tokens=len(request.prompt_ids), first_token=first_token,
        block_hashes=list(hashes), lease_deadline_ms=int((time.time() + cfg.handoff_lease_s) * 1000),
    )


def events_proto(config: WorkerConfig, events: tuple[KvEvent, ...],
                 last_seq: int | None = None) -> worker_pb2.KvEventBatch:
    """KV events (workers.kv.events) as tandem.v1.KvEventBatch; `last_seq`: the newest seq the rank
    has produced (None: none yet)."""
    out = worker_pb2.KvEventBatch(worker=worker_pb2.WorkerId(instance=config.instance, dp_rank=config.rank))
    if last_seq is not None:
        out.last_seq = last_seq
    for ev in events:
        msg = out.events.add(seq=ev.seq)
        if isinstance(ev.body, KvStored):
            msg.stored.block_hashes.extend(ev.body.block_hashes)
            if ev.body.parent_hash is not None:
                msg.stored.parent_hash = ev.body.parent_hash
            msg.stored.held_only = ev.body.held_only
        elif isinstance(ev.body, KvRemoved):
            msg.removed.block_hashes.extend(ev.body.block_hashes)
        elif isinstance(ev.body, KvCleared):
            msg.cleared.SetInParent()
    return out
