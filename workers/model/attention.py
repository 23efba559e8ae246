"""DeepSeek-V4 attention of one layer: SWA window, plus CSA / HCA compressed entries.

Legend: T new tokens of one sequence, H query heads, D head_dim (512), R rope dims (64),
W window keys, N compressed entries, G output groups.

q  = wq_b(q_norm(wq_a(x))) -> [T, H, D], scaled to unit RMS per head, RoPE on the last R dims
kv = kv_norm(wkv(x)) -> [T, D], RoPE; nope dims FP8-simulated (quant_sim)
keys = window (last `window` tokens, causal) + entries (j < (t + 1) // ratio; CSA: indexer top-k)
o = softmax(q K^T / sqrt(D), plus a per-head sink logit in the denominator) K       (K == V)
o[-R:] rotated back by -position; out = wo_b(concat_g(o_g @ wo_a[g]^T))
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import ops
from workers.model.cache import EntryKind, ModelCache
from workers.model.compressor import Compressor
from workers.model.config import LayerKind, ModelConfig
from workers.model.indexer import Indexer
from workers.model.layers import Linear, RMSNorm, rms_unit, wide
from workers.model.quant import kv_sim
from workers.model.rope import Rope


class Attention(nn.Module):
    """Attention of layer `layer` (kind from the config; MTP layers are SWA)."""

    def __init__(self, cfg: ModelConfig, kind: LayerKind, sim: bool) -> None:
        super().__init__()
        self.cfg, self.kind, self.sim = cfg, kind, sim
        self.ratio = cfg.ratio(kind)
        h, d = cfg.num_heads, cfg.head_dim
        self.wq_a = Linear(cfg.hidden_size, cfg.q_lora_rank, quantised_input=True, sim=sim)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, h * d, quantised_input=True, sim=sim)
        self.wkv = Linear(cfg.hidden_size, d, quantised_input=True, sim=sim)
        self.kv_norm = RMSNorm(d, cfg.norm_eps)
        # wo_a runs as a BF16 grouped einsum in the reference: no FP8 input.
        self.wo_a = Linear(
            h * d // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, quantised_input=False, sim=sim
        )
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size, quantised_input=True, sim=sim)
        self.attn_sink = nn.Parameter(torch.zeros(h, dtype=torch.float32))
        self.compressor = (
            Compressor(cfg.hidden_size, d, self.ratio, overlap=kind is LayerKind.CSA, eps=cfg.norm_eps)
            if kind is not LayerKind.SWA
            else None
        )
        self.indexer = (
            Indexer(
                cfg.hidden_size,
                cfg.q_lora_rank,
                cfg.index_heads,
                cfg.index_head_dim,
                self.ratio,
                cfg.index_topk,
                cfg.norm_eps,
                sim,
            )
            if kind is LayerKind.CSA
            else None
        )
        self.rope = Rope.for_kind(cfg, kind)

    def _compress(
        self,
        x: torch.Tensor,
        layer: int,
        seq: int,
        pos0: int,
        cache: ModelCache,
        kind: EntryKind,
        module: Compressor | Indexer,
    ) -> torch.Tensor:
        """Run a compressor over the step's tokens, store what it finishes; return all entries."""
        state = cache.compressor_state(layer, seq, kind)
        if state is None:
            comp = module if isinstance(module, Compressor) else module.compressor
            state = comp.empty_state(x.device, wide(x).dtype)
        if state.end != pos0:
            raise ValueError(
                f"layer {layer} sequence {seq}: {kind.value} compressor state ends at {state.end}, "
                f"but the step starts at position {pos0}"
            )
        if isinstance(module, Indexer):
            new, state = module.new_keys(x, state, self.rope)
        else:
            new, state = module(x, state, self.rope)
            new = kv_sim(new, self.cfg.rope_head_dim, self.sim)
        cache.append_entries(layer, seq, kind, new)
        cache.set_compressor_state(layer, seq, kind, state)
        return cache.entries(layer, seq, kind)

    def forward(self, x: torch.Tensor, layer: int, seq: int, pos0: int, cache: ModelCache) -> torch.Tensor:
        """Attention output [T, hidden] for tokens x [T, hidden] of sequence `seq` at positions
        pos0 .. pos0 + T - 1, appending their state to `cache` (layer `layer`)."""
        cfg = self.cfg
        t_new, h, d, rd = x.shape[0], cfg.num_heads, cfg.head_dim, cfg.rope_head_dim
        positions = torch.arange(pos0, pos0 + t_new, device=x.device)

        qr = self.q_norm(self.wq_a(x))
        q = rms_unit(self.wq_b(qr).view(t_new, h, d), cfg.norm_eps)
        q = self.rope.apply(q, positions)
        kv = self.rope.apply(self.kv_norm(self.wkv(x)), positions)
        kv = kv_sim(kv, rd, self.sim)

        # Window keys: the stored window, then this step's tokens; causal, within `window`.
        win = cache.window(layer, seq) if pos0 > 0 else kv.new_zeros(0, d)
        local = torch.cat([win, kv], dim=0)
        key_pos = torch.arange(pos0 - win.shape[0], pos0 + t_new, device=x.device)
        delta = positions[:, None] - key_pos[None, :]
        mask = (delta >= 0) & (delta < cfg.window)
        keys = local
        if self.compressor is not None:
            entries = self._compress(x, layer, seq, pos0, cache, EntryKind.ATTN, self.compressor)
            n = entries.shape[0]
            visible = torch.arange(n, device=x.device)[None, :] < ((positions + 1) // self.ratio)[:, None]
            if self.indexer is not None:
                index_keys = self._compress(x, layer, seq, pos0, cache, EntryKind.INDEX, self.indexer)
                visible = visible & self.indexer.select(x, qr, positions, index_keys, self.rope)
            keys = torch.cat([local, entries.to(local.dtype)], dim=0)
            mask = torch.cat([mask, visible], dim=1)
        cache.append_window(layer, seq, kv)

        o = self._attend(q, keys, mask)
        o = self.rope.apply(o, positions, inverse=True)
        g = cfg.o_groups
        wo_a = self.wo_a.weight.view(g, cfg.o_lora_rank, -1)
        og = torch.einsum("tgi,gri->tgr", o.reshape(t_new, g, -1).to(wo_a.dtype), wo_a)
        return self.wo_b(og.flatten(1))

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Softmax attention with sink: q [T, H, D], keys (= values) [S, D], mask [T, S] -> [T, H, D].

        float32 / bfloat16 models run the kernel op (torch reference on CPU, Triton on GPU); a
        float64 model (the tests' reference precision) runs the same math here in float64.
        """
        scale = self.cfg.head_dim**-0.5
        if q.dtype != torch.float64:
            return ops.attend(q, keys, mask, self.attn_sink, scale)
        logits = torch.einsum("thd,sd->ths", wide(q), wide(keys)) * scale
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        sink = wide(self.attn_sink)[None, :, None].expand(q.shape[0], -1, 1)
        probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]
        return torch.einsum("ths,sd->thd", probs, wide(keys)).to(q.dtype)
