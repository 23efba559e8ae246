"""How much attention work a forward step does, per layer kind: the counts the cost model prices.

A step processes query tokens of one or more requests. Per attention kind we sum over its queries:
`attended` keys (window tokens + selected compressed entries), `scored` entries (the indexer looks
at every visible entry), and `kv_read` bytes of KV the kernels read. Prefill segments are summed
exactly with integer floors; decode batches use the batch's mean context (the simulator only
tracks a batch's size and total context, and decode costs are nearly linear in them).
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.planner.models import AttentionGeometry, ModelArch


@dataclass(frozen=True)
class AttnWork:
    attended: float
    scored: float
    kv_read: float


@dataclass(frozen=True)
class Work:
    """One forward step: `tokens` query tokens, `sampled` of which produce logits, and the
    attention work per layer kind (same order as `ModelArch.attention`)."""

    tokens: int
    sampled: int
    attn: tuple[AttnWork, ...]


def _sum_floor(n: int, m: int) -> int:
    """sum_{k=1}^{n} k // m, exactly."""
    if n <= 0:
        return 0
    q, r = divmod(n, m)
    return m * q * (q - 1) // 2 + q * (r + 1)


def _sum_min(n: int, cap: int) -> int:
    """sum_{k=1}^{n} min(k, cap)."""
    if n <= cap:
        return n * (n + 1) // 2
    return cap * (cap + 1) // 2 + (n - cap) * cap


def _sum_min_floor(n: int, m: int, cap: int) -> int:
    """sum_{k=1}^{n} min(k // m, cap): k // m reaches cap at k = cap * m."""
    knee = cap * m
    if n < knee:
        return _sum_floor(n, m)
    return _sum_floor(knee - 1, m) + (n - knee + 1) * cap


def _upto(a: AttentionGeometry, n: int) -> tuple[int, int, int]:
    """(window, selected, visible) summed over the queries at contexts 1..n."""
    window = _sum_min(n, a.window) if a.window else 0
    if a.ratio == 0:
        return window, 0, 0
    visible = _sum_floor(n, a.ratio)
    selected = _sum_min_floor(n, a.ratio, a.topk) if a.topk else visible
    return window, selected, visible


def _segment(a: AttentionGeometry, start: int, end: int) -> tuple[int, int, int]:
    """Queries at positions start..end-1 (contexts start+1..end), reading the KV of `end` tokens:
    (attended, scored, kv_read), exact integers."""
    w1, s1, v1 = _upto(a, end)
    w0, s0, v0 = _upto(a, start)
    entries = end // a.ratio if a.ratio else 0
    kv_read = min(end, a.window) * a.entry_bytes + entries * (a.entry_bytes + a.index_key_bytes)
    return (w1 - w0) + (s1 - s0), (v1 - v0) if a.indexer else 0, kv_read


def prefill_work(arch: ModelArch, segments: tuple[tuple[int, int], ...], sampled: int) -> Work:
    """A prefill step over `segments` = ((start, end), ...) token ranges of different requests.
    The per-kind sums are exact integers, so their order does not matter."""
    for start, end in segments:
        if not 0 <= start < end:
            raise ValueError(f"prefill segment (start={start}, end={end}): need 0 <= start < end")
    attn = []
    for a in arch.attention:
        attended = scored = kv_read = 0
        for s, e in segments:
            at, sc, kv = _segment(a, s, e)
            attended += at
            scored += sc
            kv_read += kv
        attn.append(AttnWork(attended=attended, scored=scored, kv_read=kv_read))
    return Work(tokens=sum(e - s for s, e in segments), sampled=sampled, attn=tuple(attn))


def decode_work(arch: ModelArch, batch: int, context_tokens: float) -> Work:
    """One decode step of `batch` requests whose contexts (new token included) sum to context_tokens."""
    if batch < 1 or context_tokens < batch:
        raise ValueError(f"decode batch={batch}, context_tokens={context_tokens}: need batch >= 1 and "
                         "context_tokens >= batch")
    mean = context_tokens / batch
    attn = []
    for a in arch.attention:
        window = min(mean, a.window) * batch
        visible = context_tokens / a.ratio if a.ratio else 0.0
        selected = min(a.topk * batch, visible) if a.topk else visible
        kv_read = (window + selected) * a.entry_bytes + visible * a.index_key_bytes
        scored = visible if a.indexer else 0.0
        attn.append(AttnWork(attended=window + selected, scored=scored, kv_read=kv_read))
    return Work(tokens=batch, sampled=batch, attn=tuple(attn))
