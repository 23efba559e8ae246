"""The layout signature two instances compare before any KV byte moves between them.

A one-sided READ copies raw pages: it is only correct when both sides agree on every byte's
meaning. The signature lists what that meaning depends on (block size, window, per-layer kinds,
the entry and key byte layouts and their dtypes, each pool's page size and segment table); its
digest is what instances exchange, and `check_pairing` names every field that differs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

from workers.kv.entry import KeyFormat
from workers.kv.geometry import KvGeometry, PoolKind

# The dtypes of each stored part (workers/kv/entry.py): entries are FP8 nope + bf16 rope + UE8M0
# scales; keys depend on the key format. Named here so a dtype change is a layout change.
_ENTRY_DTYPES = ("float8_e4m3fn", "bfloat16", "ue8m0")
_KEY_DTYPES = {KeyFormat.FP4: ("float4_e2m1", "ue8m0"), KeyFormat.FP8: ("float8_e4m3fn", "float32")}
# What a STATE segment's fp32 values are (workers/kv/geometry.py): CSA raw (kv, score) rows, HCA
# running softmax accumulators. Named so a change of either form is a layout change.
_STATE_FORMS = (("CSA", "rows: kv, score"), ("HCA", "running softmax: max, sum, weighted sum"))


class LayoutMismatch(ValueError):
    """Two instances' KV layouts differ: pairing them would move bytes that mean different things."""


@dataclass(frozen=True)
class LayoutSignature:
    """Everything a page's bytes mean, in comparable form (see module docstring)."""

    block_size: int
    window: int
    layer_kinds: tuple[str, ...]
    entry_layout: tuple[int, int, int, int]  # nope_dim, rope_dim, scale_group, nbytes
    entry_dtypes: tuple[str, ...]
    key_layout: tuple[str, int, int]  # format, dim, nbytes
    key_dtypes: tuple[str, ...]
    state_forms: tuple[tuple[str, str], ...]
    page_bytes: tuple[tuple[str, int], ...]  # (pool, bytes per page)
    page_segments: tuple[tuple[str, tuple[tuple[int, str, int, int, int], ...]], ...]

    @classmethod
    def of(cls, geometry: KvGeometry) -> LayoutSignature:
        shape = geometry.shape
        e, k = shape.entry, shape.key
        pages = [geometry.page(p) for p in PoolKind]
        return cls(
            block_size=shape.block_size,
            window=shape.window,
            layer_kinds=tuple(kind.name for kind in shape.kinds),
            entry_layout=(e.nope_dim, e.rope_dim, e.scale_group, e.nbytes),
            entry_dtypes=_ENTRY_DTYPES,
            key_layout=(k.fmt.value, k.dim, k.nbytes),
            key_dtypes=_KEY_DTYPES[k.fmt],
            state_forms=_STATE_FORMS,
            page_bytes=tuple((p.pool.value, p.nbytes) for p in pages),
            page_segments=tuple(
                (
                    p.pool.value,
                    tuple((s.layer, s.part.value, s.offset, s.items, s.item_bytes) for s in p.segments),
                )
                for p in pages
            ),
        )

    @property
    def digest(self) -> str:
        """sha256 (hex, 16 chars) of the canonical form: equal digests mean equal layouts."""
        return hashlib.sha256(repr(self).encode()).hexdigest()[:16]

    def differences(self, other: LayoutSignature) -> list[str]:
        """'field: mine != theirs' for every field that differs (empty when they match)."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out.append(f"{f.name}: {_short(mine)} != {_short(theirs)}")
        return out


def _short(value: object, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_pairing(local: LayoutSignature, remote: LayoutSignature, remote_name: str) -> None:
    """Raise LayoutMismatch naming each differing field unless the two layouts are identical."""
    diffs = local.differences(remote)
    if diffs:
        raise LayoutMismatch(
            f"KV layout of peer {remote_name!r} (digest {remote.digest}) differs from ours "
            f"(digest {local.digest}); refusing to pair: " + "; ".join(diffs)
        )
