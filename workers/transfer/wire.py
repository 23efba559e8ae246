"""The handoff descriptor on the wire: workers/transfer's `HandoffDescriptor` <-> tandem.v1.

The router forwards `tandem.v1.HandoffDescriptor` from the prefill to the decode. It carries the
prefill's agent name, the layout digest (as `layout_hash`), the epoch, the page ids per pool
(window pages in position order), the prompt length, the first token, the prompt's block hashes
and the lease deadline. The window start is not sent: both sides derive it from the prompt length
and the window size their (equal) layouts share.
"""

from __future__ import annotations

import time

from tandem.v1 import worker_pb2
from workers.kv.geometry import PoolKind
from workers.transfer.handoff import HandoffDescriptor, HandoffPages

# workers/kv's pools and tandem.v1.PoolKind, one to one.
_POOL_PB = {
    PoolKind.BLOCK: worker_pb2.POOL_KIND_BLOCK,
    PoolKind.WINDOW: worker_pb2.POOL_KIND_SWA_WINDOW,
    PoolKind.STATE: worker_pb2.POOL_KIND_COMPRESSOR_STATE,
}
_PB_POOL = {v: k for k, v in _POOL_PB.items()}


def layout_hash(digest: str) -> int:
    """The 16-hex-digit layout digest (LayoutSignature.digest) as the proto's fixed64."""
    if len(digest) != 16:
        raise ValueError(f"layout digest {digest!r} must be 16 hex digits")
    return int(digest, 16)


def window_start(num_tokens: int, window_tokens: int) -> int:
    """First position of the first window page covering a sequence's last `window_tokens` tokens."""
    return max(num_tokens - window_tokens, 0) // window_tokens * window_tokens


def fill_proto(msg: worker_pb2.HandoffDescriptor, desc: HandoffDescriptor, digest: str) -> None:
    """Write `desc`'s NIXL fields into `msg` (which already names the request and the prefill)."""
    if msg.request_id != desc.request_id:
        raise ValueError(f"descriptor of {desc.request_id!r} written into the message of {msg.request_id!r}")
    msg.agent_name = desc.agent
    msg.layout_hash = layout_hash(digest)
    msg.epoch = desc.epoch
    msg.prompt_tokens = desc.num_tokens
    del msg.pools[:]
    for kind in PoolKind:
        msg.pools.add(kind=_POOL_PB[kind], block_ids=list(desc.pages.of(kind)))
    msg.lease_deadline_ms = int((time.time() + desc.lease_s) * 1000)


def from_proto(msg: worker_pb2.HandoffDescriptor, window_tokens: int) -> HandoffDescriptor:
    """The decode's view of a forwarded descriptor; raises naming the request when it lacks the
    NIXL fields (a prefill that did not open a NIXL handoff) or a pool."""
    rid = msg.request_id
    if not msg.agent_name:
        raise ValueError(f"handoff of {rid!r}: agent_name is empty (no NIXL handoff was opened)")
    pages: dict[PoolKind, tuple[int, ...]] = {}
    for p in msg.pools:
        if p.kind not in _PB_POOL:
            raise ValueError(f"handoff of {rid!r}: pools names unknown kind {p.kind}")
        pages[_PB_POOL[p.kind]] = tuple(p.block_ids)
    missing = [k.value for k in PoolKind if k not in pages]
    if missing:
        raise ValueError(f"handoff of {rid!r}: pools lacks {missing}")
    lease_s = max(msg.lease_deadline_ms / 1000 - time.time(), 0.0)
    return HandoffDescriptor(
        rid, msg.agent_name, msg.epoch,
        HandoffPages(pages[PoolKind.BLOCK], pages[PoolKind.WINDOW], pages[PoolKind.STATE]),
        msg.prompt_tokens, window_start(msg.prompt_tokens, window_tokens), lease_s,
    )
