"""Shared fixtures of the workers tests: the tiny model (random weights, built once), the tokenizer.

Ray tests use the suite-wide `ray_session` fixture of tests/conftest.py (one cluster per session)."""

from __future__ import annotations

import pytest
import torch

from tandem.tokenizer import ByteTokenizer
from workers.model.init import init_random
from workers.model.model import DeepseekV4
from workers.model.presets import tiny

# Two shared cores: one intra-op thread per process avoids oversubscription (and is faster here).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model() -> DeepseekV4:
    return init_random(DeepseekV4(tiny(), quant_sim=False, with_mtp=False), seed=0).eval()


@pytest.fixture(scope="session")
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="session")
def tiny_model_sim() -> DeepseekV4:
    """The tiny model with the FP8 / FP4 simulation on: what the paged pools store exactly."""
    return init_random(DeepseekV4(tiny(), quant_sim=True, with_mtp=False), seed=0).eval()
