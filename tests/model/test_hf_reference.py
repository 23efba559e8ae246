"""Our model against transformers' DeepseekV4ForCausalLM, loaded from its own save_pretrained."""

from __future__ import annotations

import pytest
import torch
from dsv4_hf import save_hf_tiny

from workers.model import load, preset
from workers.model.config import load_config

pytestmark = pytest.mark.model

T = 300  # crosses the 4-, 128- and 256-token boundaries


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("hf_tiny")
    model = save_hf_tiny(preset("tiny"), path)
    return model, path


def test_transformers_config_parses_to_the_same_config(hf_checkpoint):
    _, path = hf_checkpoint
    ours = load_config(path)
    assert ours == preset("tiny").with_(num_mtp_layers=0)


def test_logits_match_transformers(hf_checkpoint):
    hf, path = hf_checkpoint
    model = load(path, quant_sim=False, progress=False)
    assert len(model.mtp) == 0  # transformers writes no MTP tensors; the loader accepts that
    ids = torch.randint(0, model.cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
    got = model.logits(ids)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-4
    # Every position agrees, not just on average (window, CSA and HCA boundaries included).
    per_pos = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert float(per_pos.max()) <= 1e-3
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_logits_match_transformers_incremental(hf_checkpoint):
    """Prefill in two chunks + decode against transformers with the same prefix."""
    hf, path = hf_checkpoint
    model = load(path, quant_sim=False, progress=False)
    ids = torch.randint(0, model.cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
    cache = model.new_cache()
    a = model.prefill(0, ids[:130], cache)
    b = model.prefill(0, ids[130:257], cache)
    c = model.decode([0], ids[257:258], cache)
    got = torch.cat([a, b, c])
    assert rel_err(got, want[:258]) <= 1e-4
