"""What logprobs cost in the sampler: one engine step's sampling of a batch at DeepSeek-V4's vocabulary.

Baseline (same run, same logits, timed alternately with it): `sample_batch`, the step's sampling
without logprobs. Measured: `token_logprobs` on the same batch with some rows asking, for top n.
Two batches: all greedy (sampling is one argmax: the harshest baseline) and mixed (half greedy,
half temperature 0.8 / top-p 0.95). Times are medians of --repeats on fixed random float32 logits
[--batch, --vocab], one thread; the machine is shared, so read the ratios. overhead =
logprobs_ms / sample_ms; with no row asking token_logprobs returns at once. float64_ms times the
straightforward alternative (a float64 log_softmax of the asking rows, then topk) on the same batch.

    python -P bench/logprobs.py [--batch 32] [--vocab 129280] [--repeats 9] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from tandem.request import SamplingConfig  # noqa: E402
from workers.engine.sampler import sample_batch, token_logprobs  # noqa: E402


@dataclass(frozen=True)
class Row:
    batch_kind: str  # "greedy" (every row argmax) or "mixed" (half greedy, half top-p sampled)
    asking: int  # rows (requests) asking for logprobs
    top_logprobs: int
    sample_ms: float  # median time of sample_batch on the batch: the baseline
    logprobs_ms: float  # median time of token_logprobs on the same batch, timed alternately
    float64_ms: float  # the straightforward way, timed alongside: float64 log_softmax of the rows + topk
    overhead: float  # logprobs_ms / sample_ms: what asking adds to the step's sampling


def _params(kind: str, batch: int, asking: int, n: int) -> list[SamplingConfig]:
    out = []
    for i in range(batch):
        ask = i < asking
        kw = {"logprobs": ask, "top_logprobs": n if ask else 0}
        sampled = kind == "mixed" and i % 2 == 1
        out.append(SamplingConfig(temperature=0.8, top_p=0.95, seed=i, **kw) if sampled else SamplingConfig(**kw))
    return out


def _float64(logits: torch.Tensor, params: list[SamplingConfig]) -> None:
    rows = [i for i, p in enumerate(params) if p.logprobs]
    if not rows:
        return
    temps = torch.tensor([1.0 if params[i].greedy else params[i].temperature for i in rows], dtype=torch.float64)
    lp = torch.log_softmax(logits[rows].double() / temps[:, None], dim=1)
    k = max(params[i].top_logprobs for i in rows)
    if k:
        torch.topk(lp, k, dim=1)


def _measure(logits: torch.Tensor, params: list[SamplingConfig], repeats: int) -> tuple[float, float, float]:
    """Median ms of sample_batch, token_logprobs and the float64 way, alternating so drift hits all."""
    positions = list(range(len(params)))
    sample, lps, f64 = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = sample_batch(logits, params, positions)
        t1 = time.perf_counter()
        token_logprobs(logits, params, tokens)
        t2 = time.perf_counter()
        _float64(logits, params)
        t3 = time.perf_counter()
        sample.append(t1 - t0)
        lps.append(t2 - t1)
        f64.append(t3 - t2)
    return tuple(statistics.median(x) * 1e3 for x in (sample, lps, f64))  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=129280)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    logits = torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(0)) * 3
    b = args.batch
    rows = []
    for kind in ("greedy", "mixed"):
        for asking, n in ((0, 0), (1, 0), (1, 20), (b // 4, 5), (b, 0), (b, 20)):
            s_ms, l_ms, f_ms = _measure(logits, _params(kind, b, asking, n), args.repeats)
            rows.append(Row(kind, asking, n, s_ms, l_ms, f_ms, l_ms / s_ms))
    print(f"batch {b}, vocab {args.vocab}, float32 logits, 1 thread, median of {args.repeats}")
    print(f"{'batch':<7} {'asking':>6} {'top_n':>5} {'sample_ms':>10} {'logprobs_ms':>11} {'float64_ms':>10} "
          f"{'overhead':>8}")
    for r in rows:
        print(f"{r.batch_kind:<7} {r.asking:>6} {r.top_logprobs:>5} {r.sample_ms:>10.2f} {r.logprobs_ms:>11.2f} "
              f"{r.float64_ms:>10.2f} {r.overhead:>8.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"batch": b, "vocab": args.vocab, "repeats": args.repeats,
                                         "rows": [asdict(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
