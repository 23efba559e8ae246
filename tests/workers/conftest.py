"""Shared fixtures of the workers tests: the tiny model (random weights, built once) and helpers."""

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
def ray_session():
    """ONE local Ray cluster for the whole test session (2 CPUs; actors ask for num_cpus=0)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
                 namespace="tandem-tests", log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_sim() -> DeepseekV4:
    """The tiny model with the FP8 / FP4 simulation on: what the paged pools store exactly."""
    return init_random(DeepseekV4(tiny(), quant_sim=True, with_mtp=False), seed=0).eval()
