"""The kernel registry: configuration, per-device choice, forcing, logging once, dispatch."""

from __future__ import annotations

import logging

import pytest
import torch

from kernels import attention_ref, indexer_triton, ops
from kernels.registry import Impl, KernelConfig, KernelRegistry

pytestmark = pytest.mark.kernels


@pytest.mark.parametrize(
    "env,want", [({}, None), ({"TANDEM_KERNELS": "auto"}, None), ({"TANDEM_KERNELS": " Torch"}, Impl.TORCH),
                 ({"TANDEM_KERNELS": "triton"}, Impl.TRITON)],
)  # fmt: skip
def test_config_from_env(env: dict[str, str], want: Impl | None) -> None:
    assert KernelConfig.from_env(env).force is want


def test_config_rejects_an_unknown_value() -> None:
    with pytest.raises(ValueError, match="TANDEM_KERNELS='cuda'"):
        KernelConfig.from_env({"TANDEM_KERNELS": "cuda"})


def test_choice_by_device_and_forcing() -> None:
    auto = KernelRegistry()
    assert auto.choose(ops.OPS.attend, torch.device("cpu")) is Impl.TORCH
    assert auto.choose(ops.OPS.attend, torch.device("cuda")) is Impl.TRITON
    assert KernelRegistry(KernelConfig(Impl.TORCH)).choose(ops.OPS.attend, torch.device("cuda")) is Impl.TORCH
    # Forced Triton on CPU runs the interpreter (the kernel tests build the kernels for it).
    assert (
        KernelRegistry(KernelConfig(Impl.TRITON)).choose(ops.OPS.attend, torch.device("cpu")) is Impl.TRITON
    )


def test_forcing_triton_on_cpu_without_the_interpreter_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kernels.registry.triton_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="attend_with_sink: Triton forced for a cpu tensor"):
        KernelRegistry(KernelConfig(Impl.TRITON)).choose(ops.OPS.attend, torch.device("cpu"))


def test_choice_is_logged_once_per_op_and_device(caplog: pytest.LogCaptureFixture) -> None:
    reg = KernelRegistry(KernelConfig(Impl.TRITON))
    scores = torch.randn(2, 20, generator=torch.Generator().manual_seed(0))
    limits = torch.tensor([20, 5])
    with caplog.at_level(logging.INFO, logger="tandem.kernels"):
        for _ in range(3):
            ops.topk_indices(scores, limits, 4, registry=reg)
        ops.index_scores(torch.randn(1, 16, 32), torch.randn(1, 16), torch.randn(3, 32), registry=reg)
    lines = [r.getMessage() for r in caplog.records if r.name == "tandem.kernels"]
    assert lines == ["kernel topk_indices on cpu: triton", "kernel index_scores on cpu: triton"]


def test_dispatch_runs_the_chosen_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = indexer_triton.topk_indices
    monkeypatch.setattr(indexer_triton, "topk_indices", lambda *a: calls.append("triton") or real(*a))
    scores, limits = torch.randn(3, 30, generator=torch.Generator().manual_seed(1)), torch.tensor([30, 2, 0])
    want = ops.topk_indices(scores, limits, 5, registry=KernelRegistry(KernelConfig(Impl.TORCH)))
    assert calls == []
    got = ops.topk_indices(scores, limits, 5, registry=KernelRegistry(KernelConfig(Impl.TRITON)))
    assert calls == ["triton"] and torch.equal(got, want)


def test_default_registry_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    ops.reset_default_registry()
    try:
        assert ops.default_registry().config.force is Impl.TRITON
        assert ops.default_registry() is ops.default_registry()
    finally:
        monkeypatch.delenv("TANDEM_KERNELS")
        ops.reset_default_registry()
    assert ops.default_registry().config.force is None


def test_every_op_has_both_implementations() -> None:
    names = set()
    for op in ops.OPS.all():
        assert callable(op.reference) and callable(op.triton()), op.name
        names.add(op.name)
    assert len(names) == len(ops.OPS.all()) == 15
    assert ops.OPS.attend.reference is attention_ref.attend_with_sink
