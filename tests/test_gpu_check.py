"""Smoke test of benchmarks/gpu_check.py on the CPU: kernels in Triton's interpreter, the comparisons' plumbing."""

import pytest
import torch

pytest.importorskip("triton", reason="the GPU check runs the Triton kernels")

from benchmarks import gpu_check  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the GPU check")


def test_cpu_only_machine_says_so_checks_every_kernel_and_exits_0(capsys):
    assert gpu_check.main([]) == 0
    output = capsys.readouterr().out
    assert "No CUDA GPU" in output
    for kernel in ("lowrank_adam", "residual_step"):
        lines = [line for line in output.splitlines() if f" {kernel} " in line]
        assert lines and all(line.rstrip().endswith("ok") for line in lines), kernel


def test_a_wrong_kernel_fails_the_check(monkeypatch):
    import galore_plus.kernels.lowrank_adam as kernel

    right = kernel.lowrank_adam_direction_triton
    monkeypatch.setattr(kernel, "lowrank_adam_direction_triton", lambda *args: right(*args) * (1 + 1e-4))
    checks = gpu_check.lowrank_adam_checks(torch.device("cpu"))
    assert checks and not any(check.passed for check in checks)


def test_a_kernel_without_a_check_fails(monkeypatch):
    monkeypatch.setattr(gpu_check, "KERNEL_CHECKS", {"lowrank_adam": lambda device: []})
    checks = gpu_check.kernel_checks(torch.device("cpu"))
    assert [check.case for check in checks] == ["residual_step: no check in benchmarks/gpu_check.py"]
    assert not checks[0].passed


def test_optimizer_comparison_runs_and_checks_movement():
    """CPU against CPU (no GPU here): the comparison code runs for every case and every weight moved."""
    checks = gpu_check.optimizer_checks(torch.device("cpu"))
    assert len(checks) == 5 * len(gpu_check.OPTIMIZER_CASES)
    assert all(check.passed for check in checks), [check.line() for check in checks if not check.passed]
