"""The chained hash of 256-token KV blocks, shared bit for bit by the router and the workers.

Block k's hash covers the salt and every token of blocks 0..k: h_k = H(h_{k-1} || tokens of block k),
with h_{-1} = H(domain || salt). So one hash names a whole prefix, a change in block k changes
hashes k.. only, and a different salt (one per tenant) changes every hash, which keeps one tenant
from learning another's prompts through cache hits. H is BLAKE2b with an 8-byte digest read as an
unsigned 64-bit little-endian int: the same on every process and machine (Python's `hash()` is
salted per process and must never be used here). Only full blocks are hashed: a partial last block
is never shared through the prefix cache.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

BLOCK_SIZE = 256
_DOMAIN = b"tandem.blocks.v1"
_MAX_TOKEN = 2**32 - 1


def _salt_bytes(salt: str | bytes | None) -> bytes:
    if salt is None:
        return b""
    if isinstance(salt, str):
        return salt.encode("utf-8")
    if isinstance(salt, bytes):
        return salt
    raise TypeError(f"salt must be str, bytes or None, got {type(salt).__name__}")


def root_hash(salt: str | bytes | None = None) -> bytes:
    """The 8-byte parent of block 0 for this salt."""
    s = _salt_bytes(salt)
    return hashlib.blake2b(_DOMAIN + len(s).to_bytes(4, "little") + s, digest_size=8).digest()


def _token_bytes(tokens: Sequence[int]) -> bytes:
    arr = array("I", tokens)  # raises OverflowError for negatives or ids >= 2**32
    if arr.itemsize != 4:  # pragma: no cover - every platform Tandem runs on has a 4-byte "I"
        raise RuntimeError(f"array('I') has itemsize {arr.itemsize}, expected 4")
    if sys.byteorder == "big":  # pragma: no cover
        arr.byteswap()
    return arr.tobytes()


def block_hashes(
    token_ids: Sequence[int], *, salt: str | bytes | None = None, block_size: int = BLOCK_SIZE
) -> list[int]:
    """Chained hashes (u64 ints) of the full `block_size`-token blocks of token_ids."""
    return _chain(root_hash(salt), token_ids, block_size)


def extend_block_hashes(parent: int, token_ids: Sequence[int], *, block_size: int = BLOCK_SIZE) -> list[int]:
    """The chain continued after a block whose hash is `parent`, over the full blocks of token_ids
    (the tokens right after that block): for any `a` of whole blocks,
    block_hashes(a + b) == block_hashes(a) + extend_block_hashes(block_hashes(a)[-1], b).
    The salt is already in `parent`. Lets a growing sequence hash each new block once."""
    if not 0 <= parent < 2**64:
        raise ValueError(f"parent hash {parent} is not an unsigned 64-bit int")
    return _chain(parent.to_bytes(8, "little"), token_ids, block_size)


def _chain(parent: bytes, token_ids: Sequence[int], block_size: int) -> list[int]:
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    try:
        data = _token_bytes(token_ids)
    except OverflowError as exc:
        bad = next(t for t in token_ids if not 0 <= t <= _MAX_TOKEN)
        raise ValueError(f"token id {bad} is outside [0, 2**32)") from exc
    out: list[int] = []
    step = 4 * block_size
    for start in range(0, len(data) - step + 1, step):
        parent = hashlib.blake2b(parent + data[start : start + step], digest_size=8).digest()
        out.append(int.from_bytes(parent, "little"))
    return out

