"""Load a checkpoint directory (config.json + safetensors, single file or sharded with an index).

Accepts the official tensor names and the ones transformers' `save_pretrained` writes; tensors
may be stored quantised (FP8 + block scales, FP4 + group scales; dequantised here for CPU) or
plain BF16 / F16 / F32. Reads only the tensors this instance needs (its `local_experts` under
expert parallelism) and validates each (name, shape, dtype) before reading it. A checkpoint
without `mtp.*` tensors gives a model without MTP; any other missing, mis-shaped or unknown tensor
is an error naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import Progress
from safetensors import safe_open

from workers.model.config import ModelConfig, load_config
from workers.model.layers import Linear, QuantizedWeight
from workers.model.model import DeepseekV4
from workers.model.names import TensorSpec, canonical_name, tensor_specs
from workers.model.quant import WeightFormat, dequantize

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.w[123]\.(weight|scale)$")
_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the tensor and what is wrong."""


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor lives: file, the name written there, dtype and shape."""

    file: Path
    stored_name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def index_checkpoint(path: Path) -> dict[str, StoredTensor]:
    """Official name -> StoredTensor for every tensor of the checkpoint at `path` (headers only)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors files in {path}")
    found: dict[str, StoredTensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for stored in st.keys():  # noqa: SIM118 -- safe_open is not iterable
                sl = st.get_slice(stored)
                dt = _SAFETENSORS_DTYPES.get(sl.get_dtype())
                if dt is None:
                    raise CheckpointError(f"{stored} in {f.name}: unsupported dtype {sl.get_dtype()}")
                name = canonical_name(stored)
                if name in found:
                    raise CheckpointError(f"{name} is stored twice ({found[name].file.name}, {f.name})")
                found[name] = StoredTensor(f, stored, dt, tuple(sl.get_shape()))
    return found


def _check(spec: TensorSpec, stored: dict[str, StoredTensor]) -> tuple[WeightFormat, StoredTensor | None]:
    """How `spec`'s tensor is stored (format as found), validating shapes and dtypes."""
    if spec.name not in stored:
        raise CheckpointError(f"missing tensor {spec.name} (expected shape {list(spec.logical_shape)})")
    t = stored[spec.name]
    scale = stored.get(spec.scale_name) if spec.scale_name else None
    if spec.fmt is WeightFormat.INT64 or t.dtype in (torch.int64, torch.int32):
        fmt, want = WeightFormat.INT64, spec.logical_shape
    elif t.dtype in _FLOATS:
        fmt, want = WeightFormat.FP32, spec.logical_shape
    elif spec.fmt in (WeightFormat.FP8_BLOCK, WeightFormat.FP4_GROUP) and t.dtype in (
        torch.float8_e4m3fn,
        torch.int8,
        torch.uint8,
    ):
        fmt = WeightFormat.FP8_BLOCK if t.dtype == torch.float8_e4m3fn else WeightFormat.FP4_GROUP
        want = (
            spec.shape
            if fmt is spec.fmt
            else TensorSpec(spec.name, spec.param, fmt, spec.logical_shape).shape
        )
        if scale is None:
            raise CheckpointError(f"missing tensor {spec.scale_name} (the scales of quantised {spec.name})")
        want_scale = TensorSpec(spec.name, spec.param, fmt, spec.logical_shape).scale_shape
        if scale.shape != want_scale:
            raise CheckpointError(
                f"tensor {spec.scale_name}: expected shape {list(want_scale or ())}, "
                f"found {list(scale.shape)}"
            )
    else:
        raise CheckpointError(f"tensor {spec.name}: dtype {t.dtype} does not fit a {spec.fmt.value} tensor")
    if t.shape != tuple(want):
        raise CheckpointError(f"tensor {spec.name}: expected shape {list(want)}, found {list(t.shape)}")
    return fmt, scale


def check_plan(
    cfg: ModelConfig, plan: dict[str, tuple[tuple[int, ...], torch.dtype]], *, with_mtp: bool = True
) -> int:
    """Validate a name -> (shape, dtype) listing (e.g. a checkpoint header, or writer.planned_tensors)
    against a meta-device model of `cfg`; returns the number of model tensors it covers.
    Raises CheckpointError on any missing, mis-shaped or unknown tensor. Allocates nothing."""
    with torch.device("meta"):
        model = DeepseekV4(cfg, with_mtp=with_mtp)
    stored = {k: StoredTensor(Path("<plan>"), k, dt, tuple(s)) for k, (s, dt) in plan.items()}
    specs = tensor_specs(model)
    used: set[str] = set()
    for spec in specs:
        _, scale = _check(spec, stored)
        used.add(spec.name)
        if scale is not None:
            used.add(scale.stored_name)
    unknown = sorted(set(stored) - used)
    if unknown:
        raise CheckpointError(f"tensors the model does not know: {unknown[:10]} ({len(unknown)} in all)")
    return len(specs)


def load(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    quant_sim: bool = True,
    device: str | torch.device = "cpu",
    local_experts: Iterable[int] | None = None,
    keep_quantized: bool = False,
    progress: bool = True,
) -> DeepseekV4:
    """The model stored at checkpoint directory `path`, in eval mode.

    dtype: the dtype of the large projections and the embedding (float32 or bfloat16); norms,
    mHC, compressors, gates and the head stay float32. local_experts: routed expert ids to load
    (all by default). keep_quantized: also keep each FP8 / FP4 weight as stored, on its Linear's
    `quantized` attribute, for kernels that take quantised weights.
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"load: dtype {dtype} is not supported (float32 or bfloat16)")
    root = Path(path)
    cfg = load_config(root)
    stored = index_checkpoint(root)
    has_mtp = any(n.startswith("mtp.") for n in stored)
    experts = None if local_experts is None else tuple(sorted(set(local_experts)))
    with torch.device("meta"):
        model = DeepseekV4(cfg, quant_sim=quant_sim, local_experts=experts, with_mtp=has_mtp)
    model.to_empty(device=device)
    specs = tensor_specs(model)
    used: set[str] = set()
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    handles: dict[Path, object] = {}
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"loading {root.name}", total=len(specs))
        for spec in specs:
            fmt, scale = _check(spec, stored)
            t = stored[spec.name]
            f = handles.setdefault(t.file, safe_open(str(t.file), framework="pt", device="cpu"))
            raw = f.get_tensor(t.stored_name)  # type: ignore[attr-defined]
            s = None
            if scale is not None:
                fs = handles.setdefault(scale.file, safe_open(str(scale.file), framework="pt", device="cpu"))
                s = fs.get_tensor(scale.stored_name)  # type: ignore[attr-defined]
                used.add(scale.stored_name)
            value = dequantize(raw, s, fmt)
            if keep_quantized and s is not None:
                owner = model.get_submodule(spec.param.rsplit(".", 1)[0])
                if isinstance(owner, Linear):
                    owner.quantized = QuantizedWeight(raw.to(device), s.to(device), fmt)
            with torch.no_grad():
                targets[spec.param].copy_(value.to(targets[spec.param].dtype))
            used.add(spec.name)
            bar.advance(task)
    skipped = {
        n
        for n in stored
        if (m := _EXPERT.search(n)) and experts is not None and int(m.group(1)) not in experts
    }
    unknown = sorted(set(stored) - used - skipped)
    if unknown:
        raise CheckpointError(
            f"{root}: tensors the model does not know: {unknown[:10]} ({len(unknown)} in all)"
        )
    if dtype != torch.float32:
        _cast_compute_weights(model, dtype)
    return model.eval()


def _cast_compute_weights(model: DeepseekV4, dtype: torch.dtype) -> None:
    """Cast the embedding and the projections that real kernels run in low precision."""
    from workers.model.compressor import Compressor

    keep = {id(m) for c in model.modules() if isinstance(c, Compressor) for m in (c.wkv, c.wgate)}
    for m in model.modules():
        if isinstance(m, Linear) and id(m) not in keep:
            m.weight.data = m.weight.data.to(dtype)
    model.embed.weight.data = model.embed.weight.data.to(dtype)
