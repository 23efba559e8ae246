"""Which implementation runs each kernel op: the torch reference or the Triton kernel.

Per op and device: Triton on CUDA, the torch reference elsewhere, unless forced by a
KernelConfig (from code, or from the environment variable TANDEM_KERNELS = torch | triton | auto).
Each (op, implementation, device type) choice is logged once per registry.

Forcing Triton for CPU tensors needs Triton's interpreter (TRITON_INTERPRET=1 set before the
kernels are imported, as the kernel tests do); without it the registry refuses with an error
rather than fall back silently.
"""

from __future__ import annotations

import enum
import importlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

ENV_VAR = "TANDEM_KERNELS"
log = logging.getLogger("tandem.kernels")


class Impl(enum.Enum):
    """An implementation family."""

    TORCH = "torch"
    TRITON = "triton"


@dataclass(frozen=True)
class KernelConfig:
    """force: run every op with this implementation; None picks per device."""

    force: Impl | None = None

    @staticmethod
    def from_env(environ: Mapping[str, str] | None = None) -> KernelConfig:
        """Read TANDEM_KERNELS (torch, triton or auto; unset = auto)."""
        env = os.environ if environ is None else environ
        raw = env.get(ENV_VAR, "auto").strip().lower()
        if raw == "auto":
            return KernelConfig(None)
        try:
            return KernelConfig(Impl(raw))
        except ValueError:
            raise ValueError(f"{ENV_VAR}={raw!r}: want one of torch, triton, auto") from None


@dataclass(frozen=True)
class KernelOp:
    """One op: its torch reference and where its Triton twin lives (imported on first use, so a
    CPU-only process never imports Triton)."""

    name: str
    reference: Callable[..., Any]
    triton_module: str
    triton_attr: str

    def triton(self) -> Callable[..., Any]:
        return getattr(importlib.import_module(self.triton_module), self.triton_attr)


def triton_interpreted() -> bool:
    """True when the Triton kernels were built for Triton's CPU interpreter."""
    formats = importlib.import_module("kernels.formats_triton")
    return type(formats.ue8m0_to_scale).__name__ == "InterpretedFunction"


def _device_of(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.device:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    raise ValueError("kernel op called without a tensor argument: cannot tell the device")


@dataclass
class KernelRegistry:
    """Picks and runs implementations; remembers which choices it has logged."""

    config: KernelConfig = KernelConfig()
    _logged: set[tuple[str, Impl, str]] = field(default_factory=set)

    def choose(self, op: KernelOp, device: torch.device) -> Impl:
        """The implementation `op` runs with on `device` (logged the first time)."""
        impl = self.config.force
        if impl is None:
            impl = Impl.TRITON if device.type == "cuda" else Impl.TORCH
        if impl is Impl.TRITON and device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"kernel op {op.name}: Triton forced for a {device.type} tensor, but the Triton kernels "
                f"were not built for the interpreter (set TRITON_INTERPRET=1 before importing kernels)"
            )
        key = (op.name, impl, device.type)
        if key not in self._logged:
            self._logged.add(key)
            log.info("kernel %s on %s: %s", op.name, device.type, impl.value)
        return impl

    def run(self, op: KernelOp, *args: Any, **kwargs: Any) -> Any:
        """Call op's chosen implementation with the arguments."""
        impl = self.choose(op, _device_of(args, kwargs))
        fn = op.reference if impl is Impl.TORCH else op.triton()
        return fn(*args, **kwargs)
