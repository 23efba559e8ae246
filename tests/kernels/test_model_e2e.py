"""The tiny model end to end with the kernel registry forced to Triton matches the torch path.

Runs only once the model calls its hot paths through kernels.ops (the wiring is the model's
owners' change); until then it is skipped with that reason. The model runs without FP8 / FP4
simulation: with it, float32 summation-order differences (a few ulp) flip some values across
an FP8 rounding boundary and a whole quantisation step then propagates, so only the
unquantised function can be compared tightly. The quantisation kernels themselves are proven
bit-exact in test_quant_kernels.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import workers.model
from kernels import ops
from workers.model.init import init_random
from workers.model.model import DeepseekV4
from workers.model.presets import tiny

pytestmark = [pytest.mark.kernels, pytest.mark.slow]


def _wired() -> bool:
    src = Path(workers.model.__file__).parent
    return any(
        "kernels.ops" in p.read_text() or "from kernels import ops" in p.read_text() for p in src.glob("*.py")
    )


def _run(model: DeepseekV4, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    cache = model.new_cache()
    out = [model.prefill(0, prompt[:260], cache), model.prefill(0, prompt[260:], cache)]
    nxt = out[-1][-1:].argmax(-1)
    for _ in range(steps):
        logits = model.decode([0], nxt, cache)
        out.append(logits)
        nxt = logits.argmax(-1)
    return torch.cat(out)


@pytest.mark.skipif(not _wired(), reason="workers/model does not call kernels.ops yet (see docs/kernels.md)")
def test_tiny_model_with_triton_kernels_matches_torch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = init_random(DeepseekV4(tiny(), with_mtp=False, quant_sim=False), seed=3)
    prompt = torch.randint(0, model.cfg.vocab_size, (300,), generator=torch.Generator().manual_seed(3))
    results = {}
    try:
        for impl in ("torch", "triton"):
            monkeypatch.setenv("TANDEM_KERNELS", impl)
            ops.reset_default_registry()
            with caplog.at_level(logging.INFO, logger="tandem.kernels"):
                results[impl] = _run(model, prompt, steps=3)
    finally:  # later tests must not inherit a forced registry
        monkeypatch.delenv("TANDEM_KERNELS")
        ops.reset_default_registry()
    # Both paths really ran: every hot path chose each implementation once.
    logged = {r.getMessage() for r in caplog.records if r.name == "tandem.kernels"}
    for impl in ("torch", "triton"):
        for op in ("attend_with_sink", "compress_pool", "index_scores", "topk_mask", "routed_experts"):
            assert f"kernel {op} on cpu: {impl}" in logged
    ref, got = results["torch"], results["triton"]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
