"""KvShapes from the model's configuration: the published V4 checkpoints and any ModelConfig.

The model config lists main layers then `num_mtp_layers` MTP layers (sliding-window only); the
cache indexes layers the same way, so compress_ratios here has one entry per main and MTP layer.
"""

from __future__ import annotations

import enum

from workers.kv.entry import EntryLayout, KeyFormat
from workers.kv.geometry import KvShape
from workers.model import presets as model_presets
from workers.model.config import ModelConfig


def kv_shape(cfg: ModelConfig, key_format: KeyFormat = KeyFormat.FP4, with_mtp: bool = True,
             mtp_hidden: bool = False) -> KvShape:
    """The cache geometry inputs of a model config (without the MTP layers for a model built
    with_mtp=False: a boundary is only cached once every layer of the geometry reached it).
    `mtp_hidden` (speculative decoding; needs with_mtp): the state page also carries the MTP
    layer's last output streams."""
    if mtp_hidden and not (with_mtp and cfg.num_mtp_layers):
        raise ValueError("kv_shape: mtp_hidden needs the MTP layers (with_mtp and num_mtp_layers > 0)")
    ratios = tuple(cfg.ratio(k) for k in cfg.layer_kinds) + (0,) * (cfg.num_mtp_layers if with_mtp else 0)
    entry = EntryLayout(nope_dim=cfg.nope_head_dim, rope_dim=cfg.rope_head_dim)
    return KvShape(
        ratios, entry=entry, index_dim=cfg.index_head_dim, key_format=key_format, window=cfg.window,
        mtp_hidden=cfg.hc_mult * cfg.hidden_size if mtp_hidden else 0,
    )


class Preset(enum.Enum):
    """A named model geometry (the model's presets); `.shape(fmt)` builds its KvShape."""

    V4_FLASH = "v4-flash"
    V4_PRO = "v4-pro"
    TINY = "tiny"

    def config(self) -> ModelConfig:
        build = {
            Preset.V4_FLASH: model_presets.v4_flash,
            Preset.V4_PRO: model_presets.v4_pro,
            Preset.TINY: model_presets.tiny,
        }[self]
        return build()

    def shape(self, key_format: KeyFormat = KeyFormat.FP4) -> KvShape:
        return kv_shape(self.config(), key_format)
