"""Tiny DeepSeek-V4 on CPU: Tandem's model against transformers' DeepseekV4ForCausalLM.

Both run the same randomised weights (a transformers model saved with `save_pretrained` and loaded
by Tandem's loader), measured in the same run on the same threads:
- prefill: one forward over a --prompt-token prompt (tokens/s);
- decode: --decode steps of one token after that prompt, each reusing the cache (tokens/s):
  Tandem's `ModelCache` path against transformers' own `past_key_values` cache;
- agreement: relative logits error between the two on the prompt.
Tandem is measured with and without the FP8 / FP4 simulation (`quant_sim`); transformers has none.
Best of --repeats.

    python -P bench/model_tiny.py [--prompt 512] [--decode 32] [--repeats 3] [--json PATH]

(-P: do not put bench/ first on sys.path, where bench/kernels.py would shadow the kernels package.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from workers.model import load, preset


@dataclass(frozen=True)
class Row:
    engine: str
    prefill_tok_s: float
    decode_tok_s: float
    rel_err_vs_transformers: float


def best(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def hf_model(path: Path):  # -> transformers.DeepseekV4ForCausalLM
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "model"))
    from dsv4_hf import save_hf_tiny  # the randomised tiny model the tests use

    return save_hf_tiny(preset("tiny"), path, seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model(Path(tmp))
        ours = {sim: load(tmp, quant_sim=sim, progress=False) for sim in (False, True)}
    n, k = args.prompt, args.decode
    ids = torch.randint(0, preset("tiny").vocab_size, (n + k,), generator=torch.Generator().manual_seed(1))
    rows = []

    with torch.no_grad():
        want = hf(ids[None, :n]).logits[0]

        def hf_prefill() -> None:
            hf(ids[None, :n])

        def hf_decode() -> float:
            cache = hf(ids[None, :n], use_cache=True).past_key_values
            t = time.perf_counter()
            for i in range(n, n + k):
                cache = hf(ids[None, i:i + 1], past_key_values=cache, use_cache=True).past_key_values
            return time.perf_counter() - t

        t_pre = best(hf_prefill, args.repeats)
        t_dec = min(hf_decode() for _ in range(args.repeats))
        rows.append(Row("transformers (baseline)", n / t_pre, k / t_dec, 0.0))

        for sim, model in ours.items():
            def prefill(model=model) -> None:
                model.logits(ids[:n])

            def decode(model=model) -> float:
                cache = model.new_cache()
                model.prefill(0, ids[:n], cache, last_only=True)
                t = time.perf_counter()
                for i in range(n, n + k):
                    model.decode([0], ids[i:i + 1], cache)
                return time.perf_counter() - t

            t_pre = best(prefill, args.repeats)
            t_dec = min(decode() for _ in range(args.repeats))
            err = float((model.logits(ids[:n]) - want).norm() / want.norm())
            rows.append(Row(f"tandem quant_sim={sim}", n / t_pre, k / t_dec, err))

    base = rows[0]
    print(f"tiny DeepSeek-V4, prompt {n} tokens, {k} decode steps, {torch.get_num_threads()} threads")
    print(f"{'engine':28} {'prefill tok/s':>14} {'x base':>7} {'decode tok/s':>13} {'x base':>7} {'rel err':>9}")
    for r in rows:
        print(f"{r.engine:28} {r.prefill_tok_s:14.0f} {r.prefill_tok_s / base.prefill_tok_s:7.2f} "
              f"{r.decode_tok_s:13.1f} {r.decode_tok_s / base.decode_tok_s:7.2f} {r.rel_err_vs_transformers:9.1e}")
    if args.json:
        args.json.write_text(json.dumps({"prompt": n, "decode": k, "rows": [asdict(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
