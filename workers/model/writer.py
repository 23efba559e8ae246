"""Save a model as a checkpoint directory in the official format (config.json + safetensors).

`fmt=None` writes the real checkpoint formats (FP8 e4m3 with UE8M0 128x128 block scales for
attention / shared-expert / MTP projections, FP4 e2m1 packed in int8 with UE8M0 per-32 scales for
routed experts, BF16 / F32 / I64 for the rest), so a real loader path is exercised; loading such
a checkpoint dequantises it, and saving that model again stores the same values.
`fmt=WeightFormat.FP32` stores every float tensor in float32 (exact round trip of any model).
Large models are split into shards with a `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from workers.model.model import DeepseekV4
from workers.model.names import TensorSpec, tensor_specs
from workers.model.quant import WeightFormat, quantize


def encode(model: DeepseekV4, fmt: WeightFormat | None = None) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor of `model` (name -> stored tensor), with FP8 / FP4 scales."""
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    out: dict[str, torch.Tensor] = {}
    for spec in tensor_specs(model, fmt):
        w, s = quantize(state[spec.param].detach(), spec.fmt)
        out[spec.name] = w.contiguous()
        if spec.scale_name is not None and s is not None:
            out[spec.scale_name] = s.contiguous()
    return out


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save(
    model: DeepseekV4, path: str | Path, *, fmt: WeightFormat | None = None, max_shard_bytes: int = 4 << 30
) -> Path:
    """Write `model` to directory `path` (created); returns the path."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.cfg.to_hf_dict(), indent=2))
    tensors = encode(model, fmt)
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map |= {k: fname for k in shard}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def planned_tensors(
    model: DeepseekV4, fmt: WeightFormat | None = None
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of everything `save` would write, without computing any value
    (works on a meta-device model of the real size)."""
    plan: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for spec in tensor_specs(model, fmt):
        plan[spec.name] = (spec.shape, spec.dtype)
        if spec.scale_name is not None and spec.scale_shape is not None:
            plan[spec.scale_name] = (spec.scale_shape, torch.float8_e8m0fnu)
    return plan


__all__ = ["TensorSpec", "encode", "planned_tensors", "save"]
