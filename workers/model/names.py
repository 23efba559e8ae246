"""Checkpoint tensor names, formats and stored shapes, derived from the model's own parameters.

Official names (DeepSeek's release) are the model's parameter paths with the mHC tensors
flattened: `layers.N.hc_attn.fn` <-> `layers.N.hc_attn_fn`, `hc_head.fn` <-> `hc_head_fn`.
transformers' `save_pretrained` writes the same suffixes under `model.` (except `head.weight`)
and spells a few differently (`model.embed_tokens.weight`, `model.hc_head.hc_fn`, and the attention's
`kv_norm` as `attn.norm`);
`canonical_name` maps either spelling to the official one.
FP8 / FP4 tensors carry a sibling `<module>.scale` (UE8M0 bytes, dtype F8_E8M0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from workers.model.quant import FP4_GROUP, WEIGHT_BLOCK, WeightFormat

# First match wins. Names are official checkpoint names.
_FORMAT_RULES: tuple[tuple[re.Pattern[str], WeightFormat], ...] = tuple(
    (re.compile(p), f)
    for p, f in (
        (r"\.ffn\.experts\.\d+\.w[123]\.weight$", WeightFormat.FP4_GROUP),
        (r"\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$", WeightFormat.FP8_BLOCK),
        (r"\.attn\.indexer\.wq_b\.weight$", WeightFormat.FP8_BLOCK),
        (r"\.ffn\.shared_experts\.w[123]\.weight$", WeightFormat.FP8_BLOCK),
        (r"^mtp\.\d+\.(e_proj|h_proj)\.weight$", WeightFormat.FP8_BLOCK),
        (r"\.tid2eid$", WeightFormat.INT64),
        (r"(hc_(attn|ffn|head)_(fn|base|scale)|\.ape|\.attn_sink|\.gate\.bias)$", WeightFormat.FP32),
        (r".*", WeightFormat.BF16),
    )
)

_HC = re.compile(r"(^|\.)hc_(attn|ffn|head)\.(fn|base|scale)$")
_HC_FLAT = re.compile(r"(^|\.)hc_(attn|ffn|head)_(fn|base|scale)$")
# transformers writes the attention's kv_norm back as `attn.norm` (its reverse renaming).
_HF_ATTN_NORM = re.compile(r"^((?:layers|mtp)\.\d+\.attn)\.norm\.weight$")
_HF_TOP = {
    "embed_tokens.weight": "embed.weight",
    "hc_head.hc_fn": "hc_head_fn",
    "hc_head.hc_base": "hc_head_base",
    "hc_head.hc_scale": "hc_head_scale",
}


def checkpoint_name(param_path: str) -> str:
    """Official checkpoint name of a model parameter / buffer path."""
    return _HC.sub(r"\1hc_\2_\3", param_path)


def param_path(ckpt_name: str) -> str:
    """Model parameter path of an official checkpoint name (inverse of checkpoint_name)."""
    return _HC_FLAT.sub(r"\1hc_\2.\3", ckpt_name)


def canonical_name(stored: str) -> str:
    """Official name of a stored tensor name in either the official or the transformers spelling."""
    name = stored[len("model.") :] if stored.startswith("model.") else stored
    name = _HF_ATTN_NORM.sub(r"\1.kv_norm.weight", name)
    return _HF_TOP.get(name, name)


def weight_format(ckpt_name: str) -> WeightFormat:
    """The format the real checkpoints store this tensor in."""
    for pattern, fmt in _FORMAT_RULES:
        if pattern.search(ckpt_name):
            return fmt
    raise AssertionError("unreachable: the last rule matches everything")


_STORED_DTYPE = {
    WeightFormat.FP8_BLOCK: torch.float8_e4m3fn,
    WeightFormat.FP4_GROUP: torch.int8,
    WeightFormat.BF16: torch.bfloat16,
    WeightFormat.FP32: torch.float32,
    WeightFormat.INT64: torch.int64,
}


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor: name, dtype and shape on disk; `scale_shape` for FP8 / FP4 tensors."""

    name: str
    param: str
    fmt: WeightFormat
    logical_shape: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return _STORED_DTYPE[self.fmt]

    @property
    def shape(self) -> tuple[int, ...]:
        if self.fmt is WeightFormat.FP4_GROUP:
            o, i = self.logical_shape
            return (o, i // 2)
        return self.logical_shape

    @property
    def scale_name(self) -> str | None:
        if self.fmt in (WeightFormat.FP8_BLOCK, WeightFormat.FP4_GROUP):
            return self.name[: -len("weight")] + "scale"
        return None

    @property
    def scale_shape(self) -> tuple[int, int] | None:
        if self.fmt is WeightFormat.FP8_BLOCK:
            o, i = self.logical_shape
            return (-(-o // WEIGHT_BLOCK), -(-i // WEIGHT_BLOCK))
        if self.fmt is WeightFormat.FP4_GROUP:
            o, i = self.logical_shape
            return (o, i // FP4_GROUP)
        return None


def tensor_specs(model: nn.Module, fmt_override: WeightFormat | None = None) -> list[TensorSpec]:
    """Every stored tensor of `model` (works on meta models). `fmt_override` (FP32 or BF16)
    stores every float tensor in that one format instead of the real checkpoint formats."""
    specs = []
    for path, t in list(model.named_parameters()) + list(model.named_buffers()):
        name = checkpoint_name(path)
        fmt = weight_format(name)
        if fmt_override is not None and fmt is not WeightFormat.INT64:
            fmt = fmt_override
        specs.append(TensorSpec(name, path, fmt, tuple(t.shape)))
    return specs
