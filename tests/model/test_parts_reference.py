"""Compressor, indexer, mHC and MoE against plain float64 loop references written here."""

from __future__ import annotations

import math

import pytest
import torch

from workers.model.compressor import Compressor
from workers.model.config import LayerKind, ModelConfig
from workers.model.indexer import Indexer
from workers.model.mhc import HyperConnection
from workers.model.moe import MoE
from workers.model.rope import Rope

pytestmark = pytest.mark.model

RD = 16  # rope dims in these small parts
THETA = 10000.0


def randomise(module: torch.nn.Module, seed: int, scale: float = 1.0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
    return module.double()


def rope_ref(v: list[float], pos: int, inverse: bool = False) -> list[float]:
    """Interleaved rotation of the last RD values of v by pos * THETA^(-2i/RD)."""
    out = list(v)
    base = len(v) - RD
    for i in range(RD // 2):
        a = pos * THETA ** (-2 * i / RD) * (-1 if inverse else 1)
        x, y = v[base + 2 * i], v[base + 2 * i + 1]
        out[base + 2 * i] = x * math.cos(a) - y * math.sin(a)
        out[base + 2 * i + 1] = x * math.sin(a) + y * math.cos(a)
    return out


def rms_ref(v: list[float], w: list[float], eps: float) -> list[float]:
    r = 1 / math.sqrt(sum(x * x for x in v) / len(v) + eps)
    return [x * r * wi for x, wi in zip(v, w, strict=True)]


def matvec(w: torch.Tensor, x: list[float]) -> list[float]:
    return [sum(w[o, i].item() * x[i] for i in range(len(x))) for o in range(w.shape[0])]


def compressor_ref(comp: Compressor, x: torch.Tensor) -> list[list[float]]:
    """Entries of a whole sequence x [T, dim], one at a time, per dimension."""
    m, d = comp.ratio, comp.head_dim
    rows = [x[t].tolist() for t in range(x.shape[0])]
    kv = [matvec(comp.wkv.weight, r) for r in rows]
    sc = [[s + comp.ape[t % m, c].item() for c, s in enumerate(matvec(comp.wgate.weight, r))]
          for t, r in enumerate(rows)]
    entries = []
    for j in range(x.shape[0] // m):
        pooled = []
        for c in range(d):
            slots = []
            if comp.overlap and j > 0:  # series A of the previous block
                slots += [(kv[t][c], sc[t][c]) for t in range(m * (j - 1), m * j)]
            off = d if comp.overlap else 0  # series B (or the only series) of this block
            slots += [(kv[t][off + c], sc[t][off + c]) for t in range(m * j, m * (j + 1))]
            top = max(s for _, s in slots)
            z = sum(math.exp(s - top) for _, s in slots)
            pooled.append(sum(k * math.exp(s - top) / z for k, s in slots))
        normed = rms_ref(pooled, comp.norm.weight.tolist(), 1e-6)
        entries.append(rope_ref(normed, m * j))
    return entries


@pytest.mark.parametrize("ratio,overlap", [(4, True), (8, False)])
def test_compressor_matches_loop_reference_one_shot_and_chunked(ratio, overlap):
    dim, d, t = 12, 32, 27
    comp = randomise(Compressor(dim, d, ratio, overlap, 1e-6), seed=1)
    rope = Rope(torch.tensor([THETA ** (-2 * i / RD) for i in range(RD // 2)], dtype=torch.float32))
    x = torch.randn(t, dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = torch.tensor(compressor_ref(comp, x), dtype=torch.float64)
    empty = comp.empty_state("cpu", torch.float64)
    one, _ = comp(x, empty, rope)
    assert one.shape == (t // ratio, d)
    torch.testing.assert_close(one, want, rtol=0, atol=1e-5)  # angles are float32, like the model
    parts, state, start = [], empty, 0
    for n in (5, 1, 7, 3, 11):  # chunk boundaries inside and across blocks
        new, state = comp(x[start:start + n], state, rope)
        parts.append(new)
        start += n
        # The state keeps only what is still needed: the unfinished block (+ the previous one),
        # as rows with overlap, as running accumulators without.
        held = state.kv.shape[0] if overlap else state.pool.count
        assert held == start - comp.state_start(start // ratio)
        assert (state.pool is None) == overlap
    torch.testing.assert_close(torch.cat(parts), one, rtol=0, atol=1e-12)


def test_indexer_scores_and_topk_match_loop_reference():
    dim, q_lora, heads, hd, ratio, topk = 10, 12, 16, 32, 4, 3
    idx = randomise(Indexer(dim, q_lora, heads, hd, ratio, topk, 1e-6, sim=False), seed=3)
    rope = Rope(torch.tensor([THETA ** (-2 * i / RD) for i in range(RD // 2)], dtype=torch.float32))
    g = torch.Generator().manual_seed(4)
    n, positions = 9, torch.arange(6, 40, 3)
    x = torch.randn(len(positions), dim, generator=g, dtype=torch.float64)
    qr = torch.randn(len(positions), q_lora, generator=g, dtype=torch.float64)
    keys = torch.randn(n, hd, generator=g, dtype=torch.float64)
    chosen = idx.select(x, qr, positions, keys, rope)
    scores = idx.scores(x, qr, positions, keys, rope)
    for r, p in enumerate(positions.tolist()):
        q = matvec(idx.wq_b.weight, qr[r].tolist())
        w = [v * hd ** -0.5 * heads ** -0.5 for v in matvec(idx.weights_proj.weight, x[r].tolist())]
        q_heads = [rope_ref(q[h * hd:(h + 1) * hd], p) for h in range(heads)]
        visible = list(range(min(n, (p + 1) // ratio)))
        ref = {}
        for s in visible:
            ks = keys[s].tolist()
            ref[s] = sum(w[h] * max(0.0, sum(a * b for a, b in zip(q_heads[h], ks, strict=True)))
                         for h in range(heads))
            assert abs(scores[r, s].item() - ref[s]) < 1e-4 * (1 + abs(ref[s]))
        best = sorted(visible, key=lambda s: -ref[s])[:topk]
        assert set(chosen[r].nonzero().flatten().tolist()) == set(best)


def test_mhc_matches_loop_reference():
    n, dim, iters, eps = 4, 6, 20, 1e-6
    hc = randomise(HyperConnection(n, dim, iters, eps, 1e-6), seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, n, dim, generator=g, dtype=torch.float64)
    out = torch.randn(3, dim, generator=g, dtype=torch.float64)
    collapsed, post, comb = hc.collapse(x)
    y = HyperConnection.expand(out, x, post, comb)
    fn, base, scale = hc.fn.tolist(), hc.base.tolist(), hc.scale.tolist()
    for r in range(3):
        flat = [v for i in range(n) for v in x[r, i].tolist()]
        rr = 1 / math.sqrt(sum(v * v for v in flat) / len(flat) + 1e-6)
        mix = [sum(fn[o][i] * flat[i] * rr for i in range(len(flat))) for o in range((2 + n) * n)]
        sig = [1 / (1 + math.exp(-z)) for z in mix]
        pre = [1 / (1 + math.exp(-(mix[i] * scale[0] + base[i]))) + eps for i in range(n)]
        pst = [2 / (1 + math.exp(-(mix[n + i] * scale[1] + base[n + i]))) for i in range(n)]
        assert sig  # the mixes feed all three weights
        c = [[mix[2 * n + i * n + j] * scale[2] + base[2 * n + i * n + j] for j in range(n)] for i in range(n)]
        for i in range(n):  # row softmax, + eps
            top = max(c[i])
            z = sum(math.exp(v - top) for v in c[i])
            c[i] = [math.exp(v - top) / z + eps for v in c[i]]
        def norm_cols(c):
            sums = [sum(c[i][j] for i in range(n)) for j in range(n)]
            return [[c[i][j] / (sums[j] + eps) for j in range(n)] for i in range(n)]
        c = norm_cols(c)
        for _ in range(iters - 1):
            c = [[v / (sum(row) + eps) for v in row] for row in c]
            c = norm_cols(c)
        assert max(abs(comb[r, i, j].item() - c[i][j]) for i in range(n) for j in range(n)) < 1e-12
        assert max(abs(post[r, i].item() - pst[i]) for i in range(n)) < 1e-12
        want_in = [sum(pre[i] * x[r, i, k].item() for i in range(n)) for k in range(dim)]
        assert max(abs(collapsed[r, k].item() - want_in[k]) for k in range(dim)) < 1e-12
        for k in range(n):
            want = [pst[k] * out[r, e].item() + sum(c[j][k] * x[r, j, e].item() for j in range(n))
                    for e in range(dim)]
            assert max(abs(y[r, k, e].item() - want[e]) for e in range(dim)) < 1e-12
        # Doubly stochastic, as the residual mixing must be.
        assert max(abs(sum(c[i][j] for i in range(n)) - 1) for j in range(n)) < 1e-5
        assert max(abs(sum(c[i]) - 1) for i in range(n)) < 1e-3


def moe_config() -> ModelConfig:
    return ModelConfig(vocab_size=40, hidden_size=8, layer_kinds=(LayerKind.SWA,), hash_layers=1, num_heads=1, o_groups=1,
                       n_routed_experts=6, top_k=3, moe_intermediate_size=5, routed_scaling_factor=1.5,
                       swiglu_limit=2.0)


def moe_ref(moe: MoE, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    cfg, gate = moe.cfg, moe.gate
    out, chosen = [], []
    for r in range(x.shape[0]):
        xr = x[r].tolist()
        scores = [math.sqrt(math.log1p(math.exp(v))) for v in matvec(gate.weight, xr)]
        if gate.hashed:
            sel = gate.tid2eid[ids[r]].tolist()
        else:
            biased = [s + b for s, b in zip(scores, gate.bias.tolist(), strict=True)]
            sel = sorted(range(cfg.n_routed_experts), key=lambda e: -biased[e])[:cfg.top_k]
        total = sum(scores[e] for e in sel)
        chosen.append(sel)

        def expert(ex, weight, xr=xr):
            h = [min(a, cfg.swiglu_limit) for a in matvec(ex.w1.weight, xr)]
            u = [max(-cfg.swiglu_limit, min(b, cfg.swiglu_limit)) for b in matvec(ex.w3.weight, xr)]
            act = [a / (1 + math.exp(-a)) * b * weight for a, b in zip(h, u, strict=True)]
            return matvec(ex.w2.weight, act)

        y = [0.0] * cfg.hidden_size
        for e in sorted(sel):
            ye = expert(moe.experts[str(e)], scores[e] / total * cfg.routed_scaling_factor)
            y = [a + b for a, b in zip(y, ye, strict=True)]
        y = [a + b for a, b in zip(y, expert(moe.shared_experts, 1.0), strict=True)]
        out.append(y)
    return torch.tensor(out, dtype=torch.float64), chosen


@pytest.mark.parametrize("hashed", [True, False])
def test_moe_matches_loop_reference(hashed):
    cfg = moe_config()
    moe = randomise(MoE(cfg, hashed, sim=False), seed=7, scale=1.5)
    g = torch.Generator().manual_seed(8)
    if hashed:
        moe.gate.tid2eid.copy_(torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(cfg.vocab_size)]))
    x = torch.randn(11, cfg.hidden_size, generator=g, dtype=torch.float64)
    ids = torch.randint(0, cfg.vocab_size, (11,), generator=g)
    want, chosen = moe_ref(moe, x, ids)
    torch.testing.assert_close(moe(x, ids), want, rtol=0, atol=1e-12)
    _, got_ids = moe.gate(x, ids)
    assert [sorted(r) for r in got_ids.tolist()] == [sorted(r) for r in chosen]
    # The clamps are exercised: some pre-activations exceed the limit.
    assert (moe.shared_experts.w1(x).abs() > cfg.swiglu_limit).any()
    if hashed:  # hash routing sends each token to exactly its tid2eid experts
        assert torch.equal(got_ids, moe.gate.tid2eid[ids])


def test_selection_bias_changes_selection_but_not_weights():
    cfg = moe_config()
    moe = randomise(MoE(cfg, hashed=False, sim=False), seed=9)
    x = torch.randn(20, cfg.hidden_size, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    ids = torch.zeros(20, dtype=torch.long)
    with torch.no_grad():
        moe.gate.bias.zero_()
        moe.gate.bias[4] = 100.0  # expert 4 wins every selection
    w, sel = moe.gate(x, ids)
    assert (sel == 4).any(dim=1).all()
    scores = torch.nn.functional.softplus(x @ moe.gate.weight.T).sqrt()
    want = scores.gather(1, sel)
    torch.testing.assert_close(w, want / want.sum(1, keepdim=True) * cfg.routed_scaling_factor)
    with torch.no_grad():
        moe.gate.bias.zero_()
    _, sel0 = moe.gate(x, ids)
    assert not torch.equal(sel0, sel)  # the bias changed which experts were chosen
