"""Kernel tests: Triton's interpreter on CPU (no GPU here), native Triton where a GPU exists.

TRITON_INTERPRET must be set when the kernels are decorated (at import). It is set only around
that import and around each kernel test, then restored, so it never reaches other test folders
or the processes they start. Outputs of every Triton wrapper are poisoned (NaN / byte pattern)
so that an element a kernel fails to write cannot match its reference by luck.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator

import pytest
import torch

GPU = torch.cuda.is_available()
TRITON_MODULES = (
    "kernels.formats_triton",
    "kernels.quant_triton",
    "kernels.attention_triton",
    "kernels.compressor_triton",
    "kernels.indexer_triton",
    "kernels.moe_triton",
)


def _import_kernels() -> None:
    before = os.environ.get("TRITON_INTERPRET")
    if not GPU:
        # Triton decorates its own standard library (tl.sum, tl.cumsum, ...) at import too, so a
        # Triton imported earlier without the interpreter must be imported again under it.
        # Its compiled extension (triton._C) stays loaded: it cannot be initialised twice.
        stale = [
            m
            for m in sys.modules
            if (m.split(".")[0] == "triton" and not m.startswith("triton._C")) or m in TRITON_MODULES
        ]
        for m in stale:
            del sys.modules[m]
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in TRITON_MODULES:
            importlib.import_module(name)
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


_import_kernels()


def _poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if dtype == torch.uint8:
        return torch.full(shape, 0xAB, dtype=dtype, device=device)
    return torch.full(shape, -12345, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def _interpret_and_poison(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr("kernels.buffers.new_output", _poisoned)
    for name in TRITON_MODULES[1:]:
        mod = importlib.import_module(name)
        if hasattr(mod, "new_output"):
            monkeypatch.setattr(mod, "new_output", _poisoned)
    yield


@pytest.fixture
def device() -> torch.device:
    """Where the kernels under test run: the GPU if there is one, else the CPU (interpreter)."""
    return torch.device("cuda" if GPU else "cpu")
