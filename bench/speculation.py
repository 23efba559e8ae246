"""MTP speculative decoding against plain decoding: tokens per step and decode tok/s, same run.

The engine (one rank, contiguous cache) serves the demo checkpoint (deploy/models/tiny-demo, whose
MTP layer is trained) with --mtp-tokens k in {0 (the baseline), 1, 2}, on two workloads:
- text: prompts cut from the text the demo learned (its MTP drafts are mostly right);
- random: random byte prompts (the model's continuations are less predictable).
Each workload runs at --concurrency 1 (one request at a time) and all requests at once, greedy,
EOS ignored, --new tokens each. decode_tok_s: tokens after the first / (wall time of the run minus
the wall time of the same requests with max_tokens 1), best of --repeats. tokens_per_step: the mean
tokens a request gets from one decode step (1 without speculation, at most 1 + k with it);
acceptance: accepted / drafted tokens. same_tokens: every request's tokens equal the baseline's.

    python -P bench/speculation.py [--requests 8] [--new 48] [--repeats 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# bench/ holds scripts named like packages: import Tandem's packages from the installed tree.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from tandem.request import GenerationRequest, SamplingConfig  # noqa: E402
from tandem.tokenizer import ByteTokenizer  # noqa: E402
from workers.engine.engine import Engine, Role  # noqa: E402
from workers.engine.kv import BlockSpace, BlockSpaceConfig  # noqa: E402
from workers.engine.runner import LocalRunner  # noqa: E402
from workers.engine.scheduler import SchedulerConfig  # noqa: E402
from workers.engine.speculate import SpeculationConfig, Speculator  # noqa: E402
from workers.model import load  # noqa: E402
from workers.model.model import DeepseekV4  # noqa: E402
from workers.model.train_demo import CORPUS  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "deploy" / "models" / "tiny-demo"
TOK = ByteTokenizer()


@dataclass(frozen=True)
class Row:
    workload: str
    concurrency: int
    mtp_tokens: int
    output_tokens: int
    decode_deltas: int  # (request, decode step) pairs that produced tokens
    tokens_per_step: float
    acceptance: float  # accepted / drafted draft tokens
    decode_s: float
    decode_tok_s: float
    speedup: float  # decode_tok_s / the baseline's (mtp_tokens 0) of the same workload and concurrency
    same_tokens: bool


def prompts(workload: str, n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    if workload == "text":
        text = TOK.encode(CORPUS, add_bos=False)
        starts = torch.randint(0, len(text) - 48, (n,), generator=g).tolist()
        return [text[s : s + 16 + 4 * i] for i, s in enumerate(starts)]
    return [torch.randint(0, 256, (16 + 8 * i,), generator=g).tolist() for i in range(n)]


def engine(model: DeepseekV4, k: int) -> Engine:
    kv = BlockSpace(BlockSpaceConfig(256, 256), model.cfg.window)
    spec = Speculator(model, SpeculationConfig(k)) if k else None
    return Engine(Role.AGGREGATED, model.cfg, SchedulerConfig(), kv, LocalRunner(model), TOK, spec)


def serve(model: DeepseekV4, k: int, batch: list[list[int]], concurrency: int, new: int
          ) -> tuple[float, dict[str, list[int]], int, int, int]:
    """(wall s, tokens per request, decode deltas, drafted, accepted) of serving `batch`,
    `concurrency` requests at a time."""
    eng = engine(model, k)
    sp = SamplingConfig(max_tokens=new, ignore_eos=True)
    out: dict[str, list[int]] = {}
    deltas = 0
    t0 = time.perf_counter()
    for lo in range(0, len(batch), concurrency):
        for i in range(lo, min(lo + concurrency, len(batch))):
            eng.add(GenerationRequest(f"r{i}", tuple(batch[i]), sp))
        while eng.has_work:
            for d in eng.step().deltas:
                deltas += bool(d.token_ids) and d.request_id in out  # a decode step's tokens
                out.setdefault(d.request_id, []).extend(d.token_ids)
    wall = time.perf_counter() - t0
    st = eng.stats()
    return wall, out, deltas, st.drafted_tokens, st.accepted_tokens


def measure(model: DeepseekV4, workload: str, concurrency: int, ks: list[int], args: argparse.Namespace
            ) -> list[Row]:
    batch = prompts(workload, args.requests)
    rows: list[Row] = []
    base: tuple[float, dict[str, list[int]]] | None = None
    for k in ks:
        best = None
        for _ in range(args.repeats):
            prefill_wall = serve(model, k, batch, concurrency, 1)[0]
            wall, toks, steps, drafted, accepted = serve(model, k, batch, concurrency, args.new)
            decode_s = max(wall - prefill_wall, 1e-9)
            if best is None or decode_s < best[0]:
                best = (decode_s, toks, steps, drafted, accepted)
        assert best is not None
        decode_s, toks, steps, drafted, accepted = best
        after_first = sum(len(t) - 1 for t in toks.values())
        rate = after_first / decode_s
        if base is None:
            base = (rate, toks)
        rows.append(Row(workload, concurrency, k, sum(len(t) for t in toks.values()), steps,
                        after_first / max(steps, 1), accepted / drafted if drafted else 0.0, decode_s, rate,
                        rate / base[0], toks == base[1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mtp-tokens", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.mtp_tokens[0] != 0:
        ap.error("--mtp-tokens must start with 0: the baseline every row is compared with")
    torch.set_num_threads(1)
    model = load(DEMO, dtype=torch.float32, quant_sim=False, progress=False)
    rows = [r for w in ("text", "random") for c in (1, args.requests)
            for r in measure(model, w, c, args.mtp_tokens, args)]
    head = (f"{'workload':8} {'conc':>4} {'mtp':>3} {'out tok':>7} {'deltas':>6} {'tok/step':>8} "
            f"{'accept':>6} {'decode s':>8} {'decode tok/s':>12} {'x base':>6} same_tokens")
    print(head)
    for r in rows:
        print(f"{r.workload:8} {r.concurrency:4d} {r.mtp_tokens:3d} {r.output_tokens:7d} {r.decode_deltas:6d} "
              f"{r.tokens_per_step:8.2f} {r.acceptance:6.2f} {r.decode_s:8.2f} {r.decode_tok_s:12.1f} "
              f"{r.speedup:6.2f} {r.same_tokens}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
