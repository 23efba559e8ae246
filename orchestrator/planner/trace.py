"""Requests to replay: a Mooncake JSON-lines trace, or a generated load.

Mooncake format, one JSON object per line: {"timestamp": ms, "input_length": n, "output_length":
n, "hash_ids": [...]}, each hash id standing for 512 tokens of content (equal ids = equal content,
and Mooncake's ids are prefix-chained). Tandem's router hashes 256-token blocks, so each id
becomes 512 synthetic token ids (distinct per id) and the prompt's block hashes are computed with
the one block-hash function, `tandem.blocks.block_hashes`, exactly as the router would.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass
from pathlib import Path

from tandem.blocks import block_hashes

MOONCAKE_TOKENS_PER_ID = 512
_TOKEN_SPACE = 2**32
# Content ids from here on are never in a trace: fillers for uncovered prompt tails.
FILLER_ID_BASE = 1 << 31
_MIX = 2654435761  # odd, so content_id -> start is a bijection modulo 2**32


@dataclass(frozen=True)
class TraceRequest:
    """One request: when it arrives (seconds from the start), its sizes, and its prompt's full-block
    hashes (len == prompt_tokens // 256). session_id groups the turns of one conversation."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    block_hashes: tuple[int, ...]
    session_id: str | None = None

    def __post_init__(self) -> None:
        where = f"TraceRequest({self.request_id!r})"
        if self.arrival_s < 0:
            raise ValueError(f"{where}.arrival_s = {self.arrival_s}: must be >= 0")
        if self.prompt_tokens < 1:
            raise ValueError(f"{where}.prompt_tokens = {self.prompt_tokens}: must be >= 1")
        if self.output_tokens < 1:
            raise ValueError(f"{where}.output_tokens = {self.output_tokens}: must be >= 1")


def content_tokens(content_id: int, n: int) -> array:
    """n synthetic token ids standing for content `content_id` in [0, 2**32): distinct ids start at
    distinct token ids, so their blocks never hash alike."""
    if not 0 <= content_id < _TOKEN_SPACE:
        raise ValueError(f"content_id = {content_id}: must be in [0, 2**32)")
    start = (content_id * _MIX) % _TOKEN_SPACE
    head = min(n, _TOKEN_SPACE - start)  # ids count up from start and wrap around at 2**32
    out = array("I", range(start, start + head))
    if head < n:
        out.extend(range(n - head))
    return out


def _prompt_hashes(hash_ids: list[int], prompt_tokens: int, filler_id: int) -> tuple[int, ...]:
    """Block hashes of the prompt the ids stand for; a tail the ids do not cover (Mooncake rounds
    lengths) is filled with content of its own, `filler_id`, shared with no other request."""
    tokens = array("I")
    for h in hash_ids:
        tokens.extend(content_tokens(h, MOONCAKE_TOKENS_PER_ID))
        if len(tokens) >= prompt_tokens:
            break
    if len(tokens) < prompt_tokens:
        tokens.extend(content_tokens(filler_id, prompt_tokens - len(tokens)))
    del tokens[prompt_tokens:]
    return tuple(block_hashes(tokens))


def parse_mooncake_line(line: str, index: int, source: str = "<trace>") -> TraceRequest:
    """One Mooncake record; errors name the line and the field."""
    where = f"{source}:{index + 1}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("timestamp", "input_length", "output_length", "hash_ids"):
        if key not in rec:
            raise ValueError(f"{where}: field {key!r} is missing")
    ids = rec["hash_ids"]
    if not isinstance(ids, list) or not all(isinstance(h, int) and h >= 0 for h in ids):
        raise ValueError(f"{where}: hash_ids = {ids!r}: must be a list of non-negative ints")
    n_in, n_out = rec["input_length"], rec["output_length"]
    if not isinstance(n_in, int) or n_in < 1:
        raise ValueError(f"{where}: input_length = {n_in!r}: must be an int >= 1")
    if not isinstance(n_out, int) or n_out < 1:
        raise ValueError(f"{where}: output_length = {n_out!r}: must be an int >= 1")
    if len(ids) * MOONCAKE_TOKENS_PER_ID < n_in - MOONCAKE_TOKENS_PER_ID:
        raise ValueError(f"{where}: {len(ids)} hash_ids cover fewer than input_length = {n_in} tokens")
    ts = rec["timestamp"]
    if not isinstance(ts, int | float) or ts < 0:
        raise ValueError(f"{where}: timestamp = {ts!r}: must be a number of milliseconds >= 0")
    hashes = _prompt_hashes(ids, n_in, filler_id=FILLER_ID_BASE + index)
    return TraceRequest(request_id=f"r{index}", arrival_s=ts / 1000.0, prompt_tokens=n_in,
                        output_tokens=n_out, block_hashes=hashes)


def load_mooncake(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """The first `limit` (all when None) requests of a Mooncake trace, in file order."""
    p = Path(path)
    out: list[TraceRequest] = []
    with p.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if limit is not None and len(out) >= limit:
                break
            if line.strip():
                out.append(parse_mooncake_line(line, i, str(p)))
    if not out:
        raise ValueError(f"{p}: no requests in the trace")
    return out
