"""Train the demo's tiny DeepSeek-V4 checkpoint on a short text, so `make demo` prints words.

    python -m workers.model.train_demo deploy/models/tiny-demo [--minutes 6]
    python -m workers.model.train_demo deploy/models/tiny-demo --mtp-only [--minutes 3]

The tiny preset (real KV geometry, byte-level vocabulary) learns `CORPUS` by heart: a few
minutes of Adam on this CPU is enough for greedy decoding to continue a sentence of it. The
result is an ordinary checkpoint directory (config.json, model.safetensors in BF16, and a
tokenizer_config.json naming the byte tokenizer), loaded like any other.

`--mtp-only` loads the checkpoint already at `out`, adds the MTP layer and trains only it
(the main weights stay frozen, so they are written back bit for bit): it learns to predict the
token after next from the main model's final streams, which is what speculative decoding drafts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tandem.tokenizer import ByteTokenizer
from workers.model.init import init_random
from workers.model.loader import load
from workers.model.model import DeepseekV4
from workers.model.presets import tiny
from workers.model.quant import WeightFormat
from workers.model.writer import save

CORPUS = (
    "Disaggregated serving splits prefill and decode across two pools of workers. "
    "The router picks a prefill worker and a decode worker for every request. "
    "Compressed KV blocks move from prefill to decode over NIXL. "
    "DeepSeek-V4 keeps its KV cache small, so long contexts stay affordable. "
    "Tandem keeps the compression end to end: in the pools, on the wire and in the router. "
)


def _forward(model: DeepseekV4, batch: list[torch.Tensor]) -> torch.Tensor:
    """Logits of a batch of sequences with autograd on (model.step itself runs without it)."""
    step = DeepseekV4.step.__wrapped__  # the undecorated method: the serving path stays no_grad
    return step(model, [(i, t) for i, t in enumerate(batch)], model.new_cache()).logits


def train(minutes: float, seed: int = 0, seq_len: int = 160, batch: int = 4) -> tuple[DeepseekV4, float]:
    tok = ByteTokenizer()
    cfg = dataclasses.replace(tiny(), bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = init_random(DeepseekV4(cfg, quant_sim=False, with_mtp=False), seed=seed)
    model.requires_grad_(True)
    data = torch.tensor(tok.encode(CORPUS * 3, add_bos=False))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    deadline = time.monotonic() + minutes * 60
    loss_v, step = float("inf"), 0
    while time.monotonic() < deadline and loss_v > 0.02:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=g).tolist()
        seqs = [data[s : s + seq_len + 1] for s in starts]
        with torch.enable_grad():
            logits = _forward(model, [s[:-1] for s in seqs])
            loss = F.cross_entropy(logits, torch.cat([s[1:] for s in seqs]))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        loss_v, step = loss.item(), step + 1
        if step % 10 == 0:
            print(f"step {step}: loss {loss_v:.3f}", flush=True)
    model.requires_grad_(False)
    return model.eval(), loss_v


def train_mtp(checkpoint: Path, minutes: float, seed: int = 0, seq_len: int = 160, batch: int = 4
              ) -> tuple[DeepseekV4, float]:
    """The checkpoint's model with its MTP layer 0 trained (randomly initialised first) to predict
    token p + 2 from the main model's final streams at p and the embedding of token p + 1."""
    frozen = load(checkpoint, dtype=torch.float32, quant_sim=False, progress=False)
    model = init_random(DeepseekV4(frozen.cfg, quant_sim=False, with_mtp=True), seed=seed)
    model.load_state_dict(frozen.state_dict(), strict=False)  # main weights: the checkpoint's
    model.mtp.requires_grad_(True)
    data = torch.tensor(ByteTokenizer().encode(CORPUS * 3, add_bos=False))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.mtp.parameters(), lr=3e-3, weight_decay=0.0)
    mtp = model.mtp[0]
    deadline = time.monotonic() + minutes * 60
    loss_v, step = float("inf"), 0
    while time.monotonic() < deadline and loss_v > 0.05:
        starts = torch.randint(0, len(data) - seq_len - 2, (batch,), generator=g).tolist()
        seqs = [data[s : s + seq_len + 2] for s in starts]
        cache = model.new_cache()
        out = model.step([(i, s[:seq_len]) for i, s in enumerate(seqs)], cache)  # no grad: frozen
        nxt = torch.cat([s[1 : seq_len + 1] for s in seqs])
        with torch.enable_grad():
            logits, _ = mtp.predict(out.streams, model.embed(nxt), nxt, out.segments,
                                    model.cfg.num_layers, cache, model.head.weight)
            loss = F.cross_entropy(logits, torch.cat([s[2:] for s in seqs]))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.mtp.parameters(), 1.0)
            opt.step()
        loss_v, step = loss.item(), step + 1
        if step % 10 == 0:
            print(f"mtp step {step}: loss {loss_v:.3f}", flush=True)
    model.requires_grad_(False)
    return model.eval(), loss_v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--mtp-only", action="store_true", help="train only the MTP layer of the checkpoint OUT")
    args = ap.parse_args()
    model, loss = train_mtp(args.out, args.minutes) if args.mtp_only else train(args.minutes)
    save(model, args.out, fmt=WeightFormat.BF16)
    (args.out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ByteTokenizer"}))
    prompt = torch.tensor(ByteTokenizer().encode("The router picks"))
    text = ByteTokenizer().decode(model.generate(prompt, 40))
    print(f"final loss {loss:.3f}; 'The router picks' -> {text!r}")


if __name__ == "__main__":
    main()
