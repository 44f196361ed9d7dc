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
    for kernel in ("lowrank_adam", "residual_step", "weight_update"):
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
    assert [check.case for check in checks] == [f"{name}: no check in benchmarks/gpu_check.py"
                                                for name in ("residual_step", "weight_update")]
    assert not any(check.passed for check in checks)


def test_optimizer_comparison_runs_and_checks_movement():
    """CPU against CPU (no GPU here): the comparison code runs for every case and every weight moved."""
    checks = gpu_check.optimizer_checks(torch.device("cpu"))
    assert len(checks) == 5 * len(gpu_check.OPTIMIZER_CASES)
    assert all(check.passed for check in checks), [check.line() for check in checks if not check.passed]
    run = gpu_check.optimizer_run(gpu_check.OPTIMIZER_CASES[0], torch.device("cpu"))
    assert not torch.equal(run.one_basis[0], run.final[0])  # the snapshot at t = GAP is a copy, not the live weight


def alternate_runs(monkeypatch, second_run):
    """Make every second call of gpu_check.optimizer_run (the "device" run) go through ``second_run``."""
    original, calls = gpu_check.optimizer_run, []

    def run(case, device):
        calls.append(case)
        return original(case, device) if len(calls) % 2 else second_run(original, case, device)

    monkeypatch.setattr(gpu_check, "optimizer_run", run)


def test_float32_level_differences_pass(monkeypatch):
    """Another device's arithmetic, modelled as every draw (values, gradients, sketches) off by 1e-6 relative."""
    randn = torch.randn

    def noisy(original, case, device):
        with monkeypatch.context() as patch:
            patch.setattr(torch, "randn", lambda *a, **k: (lambda x: x * (1 + 1e-6 * randn(x.shape)))(randn(*a, **k)))
            return original(case, device)

    alternate_runs(monkeypatch, noisy)
    torch.manual_seed(0)
    float32_cases = [case for case in gpu_check.OPTIMIZER_CASES if case.weight_dtype == torch.float32]
    monkeypatch.setattr(gpu_check, "OPTIMIZER_CASES", float32_cases)
    checks = gpu_check.optimizer_checks(torch.device("cpu"))
    assert all(check.passed for check in checks), [check.line() for check in checks if not check.passed]


def test_a_wrong_weight_decay_on_the_device_fails(monkeypatch):
    def doubled_decay(original, case, device):
        with monkeypatch.context() as patch:
            real = gpu_check.GaLorePlusAdamW
            patch.setattr(gpu_check, "GaLorePlusAdamW", lambda groups, **kw: real(groups, **{**kw, "weight_decay": 0.2}))
            return original(case, device)

    alternate_runs(monkeypatch, doubled_decay)
    monkeypatch.setattr(gpu_check, "OPTIMIZER_CASES", gpu_check.OPTIMIZER_CASES[:1])
    checks = {check.case: check.passed for check in gpu_check.optimizer_checks(torch.device("cpu"))}
    assert not checks["svd float32: weight at t=3"] and not checks["svd float32: plain 64x64 at t=3"]


def test_weight_update_speed_times_both_paths_and_the_product():
    """The CPU runs the kernel in Triton's interpreter: only that the three timings are taken and printed is checked."""
    [line] = gpu_check.weight_update_speed(torch.device("cpu"), shapes=((40, 30),), rank=4, repeats=1)
    assert line.startswith("weight update 40x30 r4 bfloat16: torch row blocks ")
    assert "one-pass kernel" in line and "P X alone" in line
