"""GPU kinds, their published numbers, and the shared efficiencies every prediction uses.

Numbers are per GPU, dense (no sparsity), from ../shared/docs/peers.md ("Published numbers"):
NVIDIA data sheets for H100/H200/B200/B300/GB200/GB300. Hopper has no FP4 tensor cores: FP4
weights there are read as FP4 bytes but multiplied at the FP8 rate (weight-only FP4).

The efficiencies are the ONLY fitted numbers in the planner: one compute efficiency and one
memory-bandwidth efficiency per GPU generation, and one per-layer latency floor shared by every
GPU. `bench/planner_calibration.py` prints them next to its predictions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType


class Generation(enum.Enum):
    HOPPER = "hopper"
    BLACKWELL = "blackwell"


class GpuKind(enum.Enum):
    """The GPU kinds the planner knows; the value is the CLI name."""

    H100 = "h100"
    H200 = "h200"
    B200 = "b200"
    B300 = "b300"
    GB200 = "gb200"
    GB300 = "gb300"


class LinkKind(enum.Enum):
    NVLINK = "nvlink"
    RDMA = "rdma"


@dataclass(frozen=True)
class Gpu:
    """One GPU's peak numbers. TFLOPS are dense tensor-core peaks; bandwidths are bytes/s."""

    kind: GpuKind
    generation: Generation
    bf16_flops: float
    fp8_flops: float
    fp4_flops: float
    hbm_bytes: float
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float
    nvlink_domain: int  # GPUs in one NVLink domain (HGX node or NVL72 rack)
    nic_bytes_per_s: float  # per-GPU RDMA NIC line rate


@dataclass(frozen=True)
class Efficiencies:
    """Fraction of peak reached, per generation; see module docstring."""

    compute: float
    bandwidth: float

    def __post_init__(self) -> None:
        for name in ("compute", "bandwidth"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"Efficiencies.{name} = {value!r}: must be in (0, 1]")


T = 1e12
G = 1e9
GBIT = 1e9 / 8

GPUS = MappingProxyType({
    GpuKind.H100: Gpu(GpuKind.H100, Generation.HOPPER, 989 * T, 1979 * T, 1979 * T,
                      80 * G, 3.35e12, 450 * G, 8, 400 * GBIT),
    GpuKind.H200: Gpu(GpuKind.H200, Generation.HOPPER, 989 * T, 1979 * T, 1979 * T,
                      141 * G, 4.8e12, 450 * G, 8, 400 * GBIT),
    # B200 memory: 180 GB (DGX B200: 1,440 GB over 8 GPUs); NIC: ConnectX-7 400 Gb/s per GPU.
    GpuKind.B200: Gpu(GpuKind.B200, Generation.BLACKWELL, 2250 * T, 4500 * T, 9000 * T,
                      180 * G, 8e12, 900 * G, 8, 400 * GBIT),
    GpuKind.B300: Gpu(GpuKind.B300, Generation.BLACKWELL, 2250 * T, 4500 * T, 13500 * T,
                      268 * G, 8e12, 900 * G, 8, 800 * GBIT),
    GpuKind.GB200: Gpu(GpuKind.GB200, Generation.BLACKWELL, 2500 * T, 5000 * T, 10000 * T,
                       192 * G, 8e12, 900 * G, 72, 400 * GBIT),
    GpuKind.GB300: Gpu(GpuKind.GB300, Generation.BLACKWELL, 2500 * T, 5000 * T, 15000 * T,
                       288 * G, 8e12, 900 * G, 72, 800 * GBIT),
})

# Fitted once against bench/planner_calibration.py's Blackwell rows (SGLang day-0 DeepSeek-V4
# kernels: prefill reaches a small fraction of the tensor-core peak). Hopper has no published V4
# figure to fit, so it shares Blackwell's values; treat Hopper predictions as uncalibrated.
EFFICIENCIES = MappingProxyType({
    Generation.HOPPER: Efficiencies(compute=0.05, bandwidth=0.8),
    Generation.BLACKWELL: Efficiencies(compute=0.05, bandwidth=0.8),
})
# Generations with published DeepSeek-V4 figures behind their efficiencies.
CALIBRATED = frozenset({Generation.BLACKWELL})

# Per transformer layer per forward step: kernel launches, synchronisation, small-message
# collectives not otherwise charged. Shared by every GPU kind and model.
LAYER_LATENCY_FLOOR_S = 20e-6

# Measured transport numbers (peers.md), not fitted: TRT-LLM's NVLink all-to-all on GB200 reaches
# about 80% of 900 GB/s with a ~20 us floor; NIXL over RoCE reaches 85% of line rate; DeepEP's
# low-latency RDMA dispatch starts at ~77 us (EP8).
LINK_EFFICIENCY = MappingProxyType({LinkKind.NVLINK: 0.80, LinkKind.RDMA: 0.85})
LINK_LATENCY_S = MappingProxyType({LinkKind.NVLINK: 20e-6, LinkKind.RDMA: 77e-6})

# vLLM's default gpu_memory_utilization: the share of HBM for weights plus KV; the rest is
# activations, CUDA graphs and the allocator's slack.
MEMORY_UTILISATION = 0.9


def gpu(kind: GpuKind) -> Gpu:
    """The published numbers of one GPU kind."""
    if not isinstance(kind, GpuKind):
        raise TypeError(f"gpu kind must be a GpuKind, got {kind!r}; known: {[k.value for k in GpuKind]}")
    return GPUS[kind]


def efficiencies(kind: GpuKind) -> Efficiencies:
    """The shared efficiencies of this GPU's generation."""
    return EFFICIENCIES[gpu(kind).generation]


def link_bytes_per_s(g: Gpu, link: LinkKind) -> float:
    """Achieved per-GPU bandwidth of a link kind on this GPU."""
    line = g.nvlink_bytes_per_s if link is LinkKind.NVLINK else g.nic_bytes_per_s
    return line * LINK_EFFICIENCY[link]


def link_for_group(g: Gpu, group_gpus: int) -> LinkKind:
    """The link a collective over `group_gpus` GPUs uses: NVLink when it fits one domain."""
    return LinkKind.NVLINK if group_gpus <= g.nvlink_domain else LinkKind.RDMA


def shared_constants() -> dict[str, float]:
    """The fitted constants every prediction shares, by name (for outputs that must list them)."""
    out = {f"{gen.value}_compute_efficiency": e.compute for gen, e in EFFICIENCIES.items()}
    out |= {f"{gen.value}_bandwidth_efficiency": e.bandwidth for gen, e in EFFICIENCIES.items()}
    out["layer_latency_floor_s"] = LAYER_LATENCY_FLOOR_S
    return out
