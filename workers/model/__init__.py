"""DeepSeek-V4 in torch: config, every part of the architecture, checkpoint loading and writing.

Public API: `load(path, *, dtype, quant_sim, device)` returns a `DeepseekV4`; `model.logits(ids)`
is a full causal forward; `model.prefill` / `model.decode` run through a `ModelCache`.
"""

from workers.model.cache import CompressorState, ContiguousCache, EntryKind, ModelCache
from workers.model.config import LayerKind, ModelConfig, config_from_dict, load_config
from workers.model.loader import CheckpointError, load
from workers.model.model import DeepseekV4, StepOutput
from workers.model.presets import preset
from workers.model.writer import save

__all__ = [
    "CheckpointError",
    "CompressorState",
    "ContiguousCache",
    "DeepseekV4",
    "EntryKind",
    "LayerKind",
    "ModelCache",
    "ModelConfig",
    "StepOutput",
    "config_from_dict",
    "load",
    "load_config",
    "preset",
    "save",
]
