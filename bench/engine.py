"""Tandem's engine serving the tiny DeepSeek-V4 against transformers' generate, same run, same weights.

Workload: --requests prompts of mixed lengths (uniform in [--min-prompt, --max-prompt]), each asking
for --new greedy tokens (EOS ignored), served at each --concurrency (1: one request at a time;
16: all at once). Both engines run the same checkpoint: a randomised transformers
DeepseekV4ForCausalLM saved with save_pretrained, loaded by Tandem's loader (quant_sim=False).
- transformers: `generate` (greedy); concurrency c runs batches of c prompts, left-padded with an
  attention mask (what a user would write). Its unpadded one-at-a-time output is the token reference.
- tandem: the engine (continuous batching, chunked prefill) on 1 rank, and on an EP instance of
  --ranks ranks (plain processes over gloo, data-parallel attention, requests dealt round-robin).
prefill_tok_s: prompt tokens / time of the same run with 1 new token. output_tok_s: generated
tokens / wall time of the full run. Times are the best of --repeats runs (the machine is shared). same_tokens: every request's tokens equal the reference.

    python bench/engine.py [--concurrency 1 16] [--ranks 1 2] [--requests 16] [--new 32] [--repeats 3]
                           [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# bench/ holds scripts named like packages (bench/kernels.py would shadow the `kernels` package):
# import Tandem's packages from the installed tree, not from this script's directory.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from tandem.request import GenerationRequest, SamplingConfig  # noqa: E402
from tandem.tokenizer import ByteTokenizer  # noqa: E402
from workers.engine.engine import Engine, Role  # noqa: E402
from workers.engine.kv import BlockSpace, BlockSpaceConfig  # noqa: E402
from workers.engine.runner import LocalRunner, ModelRunner  # noqa: E402
from workers.engine.scheduler import SchedulerConfig  # noqa: E402
from workers.ep.dispatch import VariableAllToAll  # noqa: E402
from workers.ep.group import EpConfig, EpGroup  # noqa: E402
from workers.ep.runner import EpRunner, lockstep_step  # noqa: E402
from workers.model import load, preset  # noqa: E402

SCHED = SchedulerConfig(max_num_seqs=64, max_batched_tokens=2048, prefill_chunk=512)


@dataclass(frozen=True)
class Row:
    engine: str  # "tandem" or "transformers"
    ranks: int
    concurrency: int
    requests: int
    prompt_tokens: int
    output_tokens: int
    wall_s: float
    output_tok_s: float
    prefill_tok_s: float
    same_tokens: bool


def hf_model(path: Path):  # -> transformers.DeepseekV4ForCausalLM
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "model"))
    from dsv4_hf import save_hf_tiny  # the randomised tiny model the model tests use

    model = save_hf_tiny(preset("tiny"), path, seed=0)
    model.generation_config.eos_token_id = None  # fixed-length outputs, as Tandem's ignore_eos
    return model


def hf_generate(model, prompts: list[list[int]], new: int, concurrency: int) -> list[list[int]]:
    """Greedy tokens of every prompt, in batches of `concurrency` (left-padded, masked)."""
    out: list[list[int]] = []
    for i in range(0, len(prompts), concurrency):
        batch = prompts[i:i + concurrency]
        width = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, p in enumerate(batch):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0)
        out += gen[:, width:].tolist()
    return out


def make_requests(prompts: list[list[int]], new: int, tag: str) -> list[GenerationRequest]:
    sp = SamplingConfig(max_tokens=new, ignore_eos=True)
    return [GenerationRequest(f"{tag}{i}", tuple(p), sp) for i, p in enumerate(prompts)]


def serve(engine: Engine, reqs: list[GenerationRequest], concurrency: int,
          group: EpGroup | None = None) -> dict[str, list[int]]:
    """Run `reqs` keeping at most `concurrency` in the engine; tokens per request id."""
    tokens: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    queue, live = list(reqs), 0
    while True:
        while queue and live < concurrency:
            engine.add(queue.pop(0))
            live += 1
        if group is None:
            if not engine.has_work:
                return tokens
            out = engine.step()
        else:
            out = lockstep_step(engine, group)  # None once no rank has work
            if out is None:
                return tokens
        for d in out.deltas:
            tokens[d.request_id].extend(d.token_ids)
            live -= d.finish is not None


def new_engine(model, runner: ModelRunner) -> Engine:
    kv = BlockSpace(BlockSpaceConfig(num_blocks=512, block_size=256), model.cfg.window)
    return Engine(Role.AGGREGATED, model.cfg, SCHED, kv, runner, ByteTokenizer())


def timed_tandem(model, runner: ModelRunner, prompts: list[list[int]], new: int, concurrency: int,
                 group: EpGroup | None = None) -> tuple[float, float, dict[str, list[int]]]:
    """(prefill-only seconds, full-run seconds, tokens) on one rank; EP ranks start together."""
    if group is not None:
        group.any(True)  # barrier
    t = time.perf_counter()
    serve(new_engine(model, runner), make_requests(prompts, 1, "p"), concurrency, group)
    t_pre = time.perf_counter() - t
    if group is not None:
        group.any(True)
    t = time.perf_counter()
    toks = serve(new_engine(model, runner), make_requests(prompts, new, "r"), concurrency, group)
    return t_pre, time.perf_counter() - t, toks


def ep_rank(rank: int, world: int, port: int, path: str, prompts: list[list[int]], new: int,
            concurrency: int, threads: int, queue) -> None:
    """One EP rank: serves prompts[rank::world] (data-parallel attention); reports timings and tokens."""
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(threads)
        group = EpGroup(EpConfig(rank, world, master_port=port, timeout_s=60))
        cfg = preset("tiny")
        model = load(path, quant_sim=False, local_experts=group.local_experts(cfg.n_routed_experts), progress=False)
        runner = EpRunner(model, group, VariableAllToAll(group))
        # The instance serves `concurrency` requests at once, dealt round-robin over its ranks; below
        # one per rank, rank 0 serves them all and the others step idle (lockstep).
        ids = list(range(len(prompts)))
        ids = ids[rank::world] if concurrency >= world else (ids if rank == 0 else [])
        mine = [prompts[i] for i in ids]
        per_rank = concurrency // world if concurrency >= world else concurrency
        t_pre, t_run, toks = timed_tandem(model, runner, mine, new, per_rank, group)
        queue.put((rank, (t_pre, t_run, {ids[int(k[1:])]: v for k, v in toks.items()})))
        group.close()
    except BaseException as exc:  # reported to the parent
        queue.put((rank, exc))


def run_ep(world: int, path: str, prompts: list[list[int]], new: int, concurrency: int, threads: int
           ) -> tuple[float, float, list[list[int]]]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=ep_rank, args=(r, world, port, path, prompts, new, concurrency, threads, q))
             for r in range(world)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(world):
        rank, val = q.get(timeout=600)
        if isinstance(val, BaseException):
            raise val
        got[rank] = val
    for p in procs:
        p.join()
    tokens: dict[int, list[int]] = {}
    for _, _, toks in got.values():
        tokens.update(toks)
    return (max(v[0] for v in got.values()), max(v[1] for v in got.values()),
            [tokens[i] for i in range(len(prompts))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs per row")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (args.requests,), generator=g).tolist()
    prompts = [torch.randint(2, preset("tiny").vocab_size, (n,), generator=g).tolist() for n in lengths]
    n_prompt, n_out = sum(lengths), args.new * args.requests
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model(Path(tmp))
        reference = hf_generate(hf, prompts, args.new, 1)  # unpadded, one at a time
        ours = load(tmp, quant_sim=False, progress=False)
        for c in args.concurrency:
            def hf_run(c: int = c) -> tuple[float, float, list[list[int]]]:
                t = time.perf_counter()
                hf_generate(hf, prompts, 1, c)
                t_pre = time.perf_counter() - t
                t = time.perf_counter()
                toks = hf_generate(hf, prompts, args.new, c)
                return t_pre, time.perf_counter() - t, toks

            def tandem_run(world: int, c: int = c) -> tuple[float, float, list[list[int]]]:
                if world > 1:
                    return run_ep(world, tmp, prompts, args.new, c, args.threads)
                t_pre, t_run, got = timed_tandem(ours, LocalRunner(ours), prompts, args.new, c)
                return t_pre, t_run, [got[f"r{i}"] for i in range(len(prompts))]

            runs = [("transformers", 1, hf_run)] + [("tandem", w, lambda w=w: tandem_run(w)) for w in args.ranks]
            for engine, world, fn in runs:
                results = [fn() for _ in range(args.repeats)]  # best of: the machine is shared
                t_pre = min(r[0] for r in results)
                t_run = min(r[1] for r in results)
                same = all(r[2] == reference for r in results)
                rows.append(Row(engine, world, c, args.requests, n_prompt, n_out, t_run, n_out / t_run,
                                n_prompt / t_pre, same))
    print(f"tiny DeepSeek-V4 (quant_sim=False), {args.requests} requests, prompts {args.min_prompt}-"
          f"{args.max_prompt} tokens ({n_prompt} total), {args.new} new tokens each, {args.threads} thread(s)/rank")
    print(f"{'engine':13} {'ranks':>5} {'conc':>4} {'wall s':>7} {'output tok/s':>12} {'x transf.':>9} "
          f"{'prefill tok/s':>13} {'same tokens':>11}")
    base = {r.concurrency: r for r in rows if r.engine == "transformers"}
    for r in rows:
        print(f"{r.engine:13} {r.ranks:5d} {r.concurrency:4d} {r.wall_s:7.2f} {r.output_tok_s:12.1f} "
              f"{r.output_tok_s / base[r.concurrency].output_tok_s:9.2f} {r.prefill_tok_s:13.0f} "
              f"{str(r.same_tokens):>11}")
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
