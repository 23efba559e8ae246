"""Output allocation for the Triton wrappers, in one place so tests can poison it.

Kernels must write every element they return; tests replace `new_output` with a version that
fills NaN / a byte pattern, so an element a kernel forgot to write fails the comparison instead of
passing by luck of uninitialised memory.
"""

from __future__ import annotations

import torch


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor that a kernel will fill completely."""
    return torch.empty(shape, dtype=dtype, device=device)
