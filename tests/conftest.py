"""Suite-wide settings: loopback transports, GPU tests skipped without a GPU."""

from __future__ import annotations

import os

import pytest

# Collectives and transports on loopback, whatever the caller's environment says.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("UCX_NET_DEVICES", "lo")


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)



@pytest.fixture(scope="session")
def ray_session():  # noqa: ANN201
    """The one local Ray cluster of a test session (127.0.0.1, no dashboard, 2 logical CPUs).

    Actors in tests take logical slivers of CPU (or none) so two cores never leave anything pending.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=False, configure_logging=False, namespace="tandem-tests")
    yield ray
    ray.shutdown()
