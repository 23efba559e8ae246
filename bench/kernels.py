"""Kernel benchmark: each Triton kernel's time next to its roofline bound and its torch reference.

The bound of a kernel call is max(FLOPs / matmul ceiling, bytes / copy bandwidth), both measured
once per run on this GPU: one large device-to-device copy (bytes read + written) and one large
bf16 matmul. Shapes: DeepSeek-V4 Flash and Pro decode steps at batch 1, 32 and 256, one layer,
8K tokens of context per sequence. Target on H100 / H200: every kernel within 1.6x of its bound,
sparse attention decode within 1.4x. The torch reference of the same call is timed in the same run
as the baseline.

    python bench/kernels.py [--json PATH] [--quick]

Without a CUDA GPU it says so and exits 0 (the interpreter's speed means nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Run as `python bench/kernels.py`, this file's folder is sys.path[0] and the file's name would
# shadow the `kernels` package it measures; drop that entry before the package is imported.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

CONTEXT = 8192
BATCHES = (1, 32, 256)
WINDOW = 128
ENTRY_BYTES = 584


@dataclass(frozen=True)
class Shape:
    """The per-layer decode facts of one model (../shared/docs/dsv4-model.md)."""

    name: str
    hidden: int
    heads: int
    topk: int
    experts: int
    inter: int


FLASH = Shape("flash", 4096, 64, 512, 256, 2048)
PRO = Shape("pro", 7168, 128, 1024, 384, 3072)


@dataclass(frozen=True)
class Row:
    kernel: str
    model: str
    batch: int
    triton_us: float
    torch_us: float
    bound_us: float
    flops: float
    bytes: float
    target: float

    @property
    def ratio(self) -> float:
        return self.triton_us / self.bound_us

    @property
    def ok(self) -> bool:
        return self.ratio <= self.target


@dataclass(frozen=True)
class Case:
    """One benchmarked call: the Triton and torch callables and the work they do."""

    kernel: str
    triton: Callable[[], object]
    torch: Callable[[], object]
    flops: float
    bytes: float
    target: float = 1.6


def _ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50))


def measure_ceilings() -> tuple[float, float]:
    """(copy bandwidth bytes/s, bf16 matmul FLOP/s), each from one large operation."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / (_ms(lambda: dst.copy_(src)) * 1e-3)
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    flops = 2 * n**3 / (_ms(lambda: a @ b) * 1e-3)
    return bw, flops


def _pool(pages: int, slots: int, nbytes: int, g: torch.Generator) -> torch.Tensor:
    """Random bytes that decode to finite values: FP8 codes below 0x7E (NaN is 0x7F)."""
    raw = torch.randint(0, 0x7E, (pages, slots, nbytes), generator=g, dtype=torch.uint8)
    return raw.cuda()


def _entries(pages: int, slots: int, g: torch.Generator) -> torch.Tensor:
    """A pool of valid 584-byte entries: FP8 nope codes, bf16 rope dims, scales near 1, zero pad."""
    raw = _pool(pages, slots, ENTRY_BYTES, g).cpu()
    rope = torch.randn(pages, slots, 64, generator=g).to(torch.bfloat16)
    raw[..., 448:576] = rope.view(torch.uint8)
    raw[..., 576:583] = torch.randint(120, 130, (pages, slots, 7), generator=g, dtype=torch.uint8)
    raw[..., 583] = 0
    return raw.cuda()


def attention_case(s: Shape, b: int, g: torch.Generator) -> Case:
    from kernels import attention_ref, attention_triton

    n_ent = CONTEXT // 4
    per_seq = n_ent // 64
    wpool = _entries(b, WINDOW, g)
    epool = _entries(b * per_seq, 64, g)
    wtable = torch.zeros(b, CONTEXT // WINDOW, dtype=torch.int32)
    wtable[:, -1] = torch.arange(b, dtype=torch.int32)
    etable = torch.arange(b * per_seq, dtype=torch.int32).view(b, per_seq)
    idx = torch.stack([torch.randperm(n_ent, generator=g)[: s.topk] for _ in range(b)]).int()
    lens = torch.full((b,), CONTEXT, dtype=torch.int32)
    q = torch.randn(b, s.heads, 512, generator=g).to(torch.bfloat16)
    sink = torch.randn(s.heads, generator=g)
    args = (
        [t.cuda() for t in (q, wpool, wtable, lens)]
        + [WINDOW]
        + [t.cuda() for t in (epool, etable, idx, sink)]
    )
    args.append(512**-0.5)
    keys = WINDOW + s.topk
    return Case(
        "sparse_decode_attention",
        lambda: attention_triton.sparse_decode_attention(*args),
        lambda: attention_ref.sparse_decode_attention(*args),
        flops=4.0 * b * s.heads * keys * 512,
        bytes=b * keys * ENTRY_BYTES + 2 * b * s.heads * 512 * 2,
        target=1.4,
    )


def compressor_case(b: int, ratio: int, g: torch.Generator) -> Case:
    from kernels import compressor_triton
    from kernels.compressor_ref import PoolSpec, compress_pool

    overlap = ratio == 4
    width = (2 if overlap else 1) * 512
    rows = (2 if overlap else 1) * ratio
    kv = torch.randn(b, rows, width, generator=g).cuda()
    score = torch.randn(b, rows, width, generator=g).cuda()
    n_done = CONTEXT // ratio - 1
    first = torch.full((b,), n_done - 1 if overlap else n_done, device="cuda")
    done = torch.full((b,), n_done, device="cuda")
    total = done + 1
    spec = PoolSpec(n_done - 1 if overlap else n_done, n_done, n_done + 1, ratio, 512, overlap)

    def ref() -> list[torch.Tensor]:
        return [compress_pool(kv[i], score[i], spec) for i in range(b)]

    return Case(
        f"compress_pool_{'csa' if overlap else 'hca'}",
        lambda: compressor_triton.compress_pool_batched(kv, score, first, done, total, ratio, 512, overlap),
        ref,
        flops=4.0 * b * rows * 512,
        bytes=2.0 * b * rows * 512 * 4 + b * 512 * 4,
    )


def indexer_case(s: Shape, b: int, g: torch.Generator) -> list[Case]:
    from kernels import indexer_ref, indexer_triton
    from kernels.indexer_ref import KeyFormat

    n = CONTEXT // 4
    fmt = KeyFormat.FP4
    pool = _pool(b * n // 64, 64, fmt.nbytes(128), g)
    table = torch.arange(b * n // 64, dtype=torch.int32).view(b, n // 64).cuda()
    n_keys = torch.full((b,), n, dtype=torch.int32, device="cuda")
    q = torch.randn(b, 64, 128, generator=g).cuda()
    w = torch.randn(b, 64, generator=g).cuda()
    scores = torch.randn(b, n, generator=g).cuda()
    limits = torch.full((b,), n, device="cuda")
    return [
        Case(
            "index_scores_paged_fp4",
            lambda: indexer_triton.index_scores_paged(q, w, pool, table, n_keys, n, fmt),
            lambda: indexer_ref.index_scores_paged(q, w, pool, table, n_keys, n, fmt),
            flops=2.0 * b * 64 * 128 * n,
            bytes=b * n * fmt.nbytes(128) + b * n * 4,
        ),
        Case(
            "topk_indices",
            lambda: indexer_triton.topk_indices(scores, limits, s.topk),
            lambda: torch.topk(scores, s.topk, dim=-1),
            flops=0.0,
            bytes=b * n * 4 + b * s.topk * 4,
        ),
    ]


def quant_cases(s: Shape, b: int, g: torch.Generator) -> list[Case]:
    from kernels import quant, quant_triton

    x = torch.randn(b, s.hidden, generator=g).to(torch.bfloat16).cuda()
    return [
        Case(
            "fp8_act_quantize",
            lambda: quant_triton.fp8_e4m3_quantize(x, 128),
            lambda: quant.fp8_e4m3_quantize(x, 128),
            flops=0.0,
            bytes=b * s.hidden * (2 + 1) + b * s.hidden // 128,
        ),
        Case(
            "fp4_quantize",
            lambda: quant_triton.fp4_e2m1_quantize(x, 32),
            lambda: quant.fp4_e2m1_quantize(x, 32),
            flops=0.0,
            bytes=b * s.hidden * 2 + b * s.hidden // 2 + b * s.hidden // 32,
        ),
    ]


def moe_case(s: Shape, b: int, g: torch.Generator) -> Case:
    from kernels import moe_ref, moe_triton

    # One expert-parallel rank's share: 8 experts, tokens routed uniformly among all experts.
    local = 8
    x = torch.randn(b, s.hidden, generator=g).to(torch.bfloat16).cuda()
    ids = torch.stack([torch.randperm(s.experts, generator=g)[:6] for _ in range(b)]).cuda()
    wts = torch.rand(b, 6, generator=g).cuda()
    w1 = (torch.randn(local, s.inter, s.hidden, generator=g) * 0.02).to(torch.bfloat16).cuda()
    w3 = (torch.randn(local, s.inter, s.hidden, generator=g) * 0.02).to(torch.bfloat16).cuda()
    w2 = (torch.randn(local, s.hidden, s.inter, generator=g) * 0.02).to(torch.bfloat16).cuda()
    experts = list(range(local))
    rows = int((ids < local).sum())
    touched = int(torch.unique(ids[ids < local]).numel())
    args = (x, wts, ids, w1, w2, w3, experts, 10.0, None)
    return Case(
        "routed_experts_bf16",
        lambda: moe_triton.routed_experts(*args),
        lambda: moe_ref.routed_experts(*args),
        flops=6.0 * rows * s.hidden * s.inter,
        bytes=touched * 3 * s.hidden * s.inter * 2 + 2 * b * s.hidden * 2,
    )


def cases(s: Shape, b: int) -> list[Case]:
    g = torch.Generator().manual_seed(b)
    out = [attention_case(s, b, g), compressor_case(b, 4, g), compressor_case(b, 128, g)]
    out += indexer_case(s, b, g) + quant_cases(s, b, g) + [moe_case(s, b, g)]
    return out


def run(batches: tuple[int, ...]) -> tuple[list[Row], float, float]:
    bw, peak = measure_ceilings()
    rows = []
    for s in (FLASH, PRO):
        for b in batches:
            for c in cases(s, b):
                bound = max(c.flops / peak, c.bytes / bw) * 1e6
                t_tri = _ms(c.triton) * 1e3
                t_ref = _ms(c.torch) * 1e3
                rows.append(Row(c.kernel, s.name, b, t_tri, t_ref, bound, c.flops, c.bytes, c.target))
    return rows, bw, peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="batch 1 and 32 only")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA GPU here; the kernel benchmark needs one (nothing measured).")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"gpu": None, "skipped": "no CUDA GPU", "rows": []}, f, indent=2)
        return 0
    rows, bw, peak = run(BATCHES[:2] if a.quick else BATCHES)
    name = torch.cuda.get_device_name()
    print(f"{name}: copy {bw / 1e9:.0f} GB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s (measured)")
    head = f"{'kernel':<26}{'model':<7}{'batch':>6}{'triton us':>11}{'torch us':>11}{'bound us':>10}"
    print(head + f"{'x bound':>9}{'target':>8}  ok")
    for r in rows:
        print(
            f"{r.kernel:<26}{r.model:<7}{r.batch:>6}{r.triton_us:>11.1f}{r.torch_us:>11.1f}{r.bound_us:>10.1f}"
            f"{r.ratio:>9.2f}{r.target:>8.1f}  {'yes' if r.ok else 'NO'}"
        )
    if a.json:
        out = {
            "gpu": name,
            "copy_bytes_per_s": bw,
            "matmul_flops_per_s": peak,
            "rows": [asdict(r) | {"ratio": r.ratio, "ok": r.ok} for r in rows],
        }
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
