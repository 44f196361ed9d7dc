"""What only a machine with a CUDA GPU can show, in one command (a few minutes on one GPU).

    python -m benchmarks.gpu_check

1. kernels: every Triton kernel of ``galore_plus.kernels``, compiled for the GPU, against its
   float32 torch reference on the same inputs (several shapes, input dtypes, sides and modes);
2. optimizer: GaLorePlusAdamW on CUDA against the same run on the CPU (8 steps, refreshes at
   t = 1, 4, 7) for every projector, with and without the residual, float32 and bfloat16 weights:
   the parameters before the second refresh, the basis's subspace after every step (see
   :func:`compare_runs` for why not the parameters after it) and finite final weights;
3. 8-bit: the same comparison with ``optim_bits=8`` (bitsandbytes' CUDA quantisation and 8-bit AdamW);
4. speed and memory: a bfloat16 weight's update at LLaMA-2-7B's shapes through the torch row blocks
   and through the one-pass kernel (:func:`weight_update_speed`: whether the kernel pays), then
   ``benchmarks.bench_step`` on CUDA at TinyLlama-1.1B and LLaMA-2-7B layer shapes (GaLore+ against
   galore_torch and torch's fused AdamW), with peak memory from ``torch.cuda.max_memory_allocated``.

Tolerances, per weight dtype, in units of one step's size (lr, times ``scale`` for projected weights):

* float32: at most 1% of a step plus 1e-5 of the value apart (the CPU and CUDA SVD, matmul and sqrt
  round differently; the relative term matters only for values far above a step, such as the
  weights the "paper" residual mode drove to 2e5 in 3 steps of this check when it was written);
* bfloat16: at most one bfloat16 spacing at the value plus that (a float32 difference can flip a rounding);
* 8-bit: the mean difference at most 1% of the mean movement and the largest at most one step (a
  moment value next to a code boundary may round to the neighbouring code on one device only).

Every comparison first checks that the weights moved by at least a tenth of a step on average.

Without a CUDA GPU it says so, runs the kernels in Triton's interpreter on the CPU and exits 0
(parts 2-4 need a GPU). Any failed check makes the exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from galore_plus import GaLorePlusAdamW
from galore_plus.step.rounding import spacing, update_magnitude

KERNEL_ATOL, KERNEL_RTOL = 1e-6, 1e-5  # as tests/test_kernels.py
STEPS, GAP, LR, SCALE = 8, 3, 1e-2, 0.25
SUBSPACE_ATOL = 1e-4  # largest entry difference of two float32 projection matrices onto the top-8 subspace
BENCH_LAYERS = ("tinyllama-1.1b", "llama-7b")
BUDGET_SECONDS = 480  # the whole check should take at most 8 minutes on one GPU


@dataclass
class Check:
    """One line of the report: the worst error as a multiple of its tolerance (passed when at most 1)."""

    part: str
    case: str
    error_ratio: float
    passed: bool

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return f"{self.part:>10} {self.case:<62} {self.error_ratio:>15.3f} {verdict:>5}"


def failed(part: str, case: str) -> Check:
    return Check(part, case, float("nan"), False)


def use_triton_interpreter() -> None:
    """Run Triton kernels on the CPU; the variable is read when ``triton`` is first imported."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set; run this module as a fresh process")
    os.environ["TRITON_INTERPRET"] = "1"


def kernel_error_ratio(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Largest |actual - expected| / (KERNEL_ATOL + KERNEL_RTOL |expected|) over the (actual, expected) pairs."""
    return max(float(((a.float() - e.float()).abs() / (KERNEL_ATOL + KERNEL_RTOL * e.float().abs())).max())
               for a, e in pairs)


def kernel_check(case: str, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Check:
    ratio = kernel_error_ratio(pairs)
    return Check("kernel", case, ratio, ratio <= 1.0)


# ---------------------------------------------------------------- 1. kernels against their torch references


def lowrank_adam_checks(device: torch.device) -> list[Check]:
    from galore_plus.kernels.lowrank_adam import lowrank_adam_direction_triton
    from galore_plus.rules.adam import lowrank_adam_direction

    checks = []
    generator = torch.Generator().manual_seed(0)
    for shape in ((1, 1), (37, 129), (128, 4096)):
        for grad_dtype in (torch.float32, torch.bfloat16, torch.float16):
            for step in (1, 1000):
                grad = torch.randn(shape, generator=generator).to(device=device, dtype=grad_dtype)
                exp_avg = torch.randn(shape, generator=generator).to(device)
                exp_avg_sq = torch.rand(shape, generator=generator).to(device)
                reference_moments = exp_avg.clone(), exp_avg_sq.clone()
                expected = lowrank_adam_direction(grad.float(), *reference_moments, step, 0.9, 0.999, 1e-8)
                direction = lowrank_adam_direction_triton(grad, exp_avg, exp_avg_sq, step, 0.9, 0.999, 1e-8)
                case = f"lowrank_adam {shape[0]}x{shape[1]} grad {str(grad_dtype)[6:]} t={step}"
                checks.append(kernel_check(case, list(zip((direction, exp_avg, exp_avg_sq), (expected, *reference_moments)))))
    return checks


def residual_step_checks(device: torch.device) -> list[Check]:
    from galore_plus.kernels.residual_step import residual_values_triton
    from galore_plus.sparse_residual.index import flat_index, select_residual_index
    from galore_plus.sparse_residual.values import residual_values

    checks = []
    generator = torch.Generator().manual_seed(1)
    cases = [  # m, n, rank, ratio, side, mode, weight dtype; ranks above 32 loop over the kernel's rank blocks
        (40, 50, 4, 0.05, "left", "exact", torch.float32), (40, 50, 4, 0.05, "right", "paper", torch.float32),
        (256, 384, 40, 0.012, "right", "paper", torch.bfloat16), (384, 256, 33, 0.012, "left", "paper", torch.float16),
        (384, 256, 64, 0.012, "right", "exact", torch.bfloat16),
    ]
    for m, n, rank, ratio, side, mode, dtype in cases:
        def draw(*shape, positive=False):
            values = torch.rand(shape, generator=generator) if positive else torch.randn(shape, generator=generator)
            return values.to(device)

        param, grad = draw(m, n).to(dtype), draw(m, n)
        basis = draw(m, rank) if side == "left" else draw(rank, n)
        low_shape = (rank, n) if side == "left" else (m, rank)
        low_rank, low_avg, direction, low_avg_sq = draw(*low_shape), draw(*low_shape), draw(*low_shape), draw(*low_shape, positive=True)
        count = max(1, int(ratio * m * n))
        index = flat_index(*select_residual_index(basis, low_avg, side, (m, n), count), n)
        moments = draw(count), draw(count, positive=True)
        reference_moments = tuple(x.clone() for x in moments)
        scalars = dict(mode=mode, step=7, residual_step=4, beta1=0.9, beta2=0.999, eps=1e-8, lr=0.01,
                       weight_decay=0.1, scale=0.25)
        expected = residual_values(param, grad, index, *reference_moments, basis, side, low_rank, low_avg_sq,
                                   direction, **scalars)
        values = residual_values_triton(param, grad, index, *moments, basis, side, low_rank, low_avg_sq,
                                        direction, **scalars)
        case = f"residual_step {m}x{n} r{rank} {side} {mode} {str(dtype)[6:]}"
        checks.append(kernel_check(case, list(zip((values, *moments), (expected, *reference_moments)))))
    return checks


def weight_update_checks(device: torch.device) -> list[Check]:
    """The one-pass weight update against the row-block reference; the error is measured in units of one
    unit in the last place of the weight's dtype plus float32's rounding of the summed terms (2^-20 of them).
    A half-precision weight must also be rounded to nearest as the reference is: a truncating cast stays
    within one unit but rounds about half of the values differently (at most 1% may differ)."""
    from galore_plus.kernels.weight_update import apply_update_triton
    from galore_plus.step.apply import LowRankTerm, ScaledGradient, apply_update

    checks = []
    generator = torch.Generator().manual_seed(2)
    cases = [  # m, n, rank, side, terms, weight dtype; ranks above 32 loop over the kernel's rank blocks
        (40, 50, 4, "left", "both", torch.float32), (50, 40, 4, "right", "low_rank", torch.float32),
        (384, 256, 33, "left", "gradient", torch.bfloat16), (256, 384, 128, "right", "both", torch.bfloat16),
        (300, 200, 64, "left", "both", torch.float16),
    ]
    for m, n, rank, side, terms, dtype in cases:
        def draw(*shape):
            return torch.randn(shape, generator=generator).to(device)

        low_rank = gradient = None
        if terms != "gradient":
            low_rank = LowRankTerm(draw(rank, n) if side == "left" else draw(m, rank),
                                   draw(m, rank) if side == "left" else draw(rank, n), side)
        if terms != "low_rank":
            gradient = ScaledGradient(draw(m, n).bfloat16(), draw(m, 1).abs())
        start = draw(m, n).to(dtype)
        expected, actual = start.clone(), start.clone()
        apply_update(expected, 0.05, 0.9, torch.tensor(True, device=device), low_rank, gradient)
        apply_update_triton(actual, 0.05, 0.9, torch.tensor(True, device=device), low_rank, gradient)
        bound = spacing(expected, dtype) + 2**-20 * update_magnitude(start, 0.9, 0.05, low_rank, gradient)
        ratio = float(((actual.float() - expected.float()).abs() / bound).max())
        case = f"weight_update {m}x{n} r{rank} {side} {terms} {str(dtype)[6:]}"
        checks.append(Check("kernel", case, ratio, ratio <= 1.0))
        if dtype != torch.float32:
            differing = float((actual != expected).float().mean())
            checks.append(Check("kernel", f"{case} rounding", differing / 0.01,
                                differing <= 0.01))
    return checks


KERNEL_CHECKS: dict[str, Callable[[torch.device], list[Check]]] = {
    "lowrank_adam": lowrank_adam_checks,
    "residual_step": residual_step_checks,
    "weight_update": weight_update_checks,
}


def kernel_checks(device: torch.device) -> list[Check]:
    """Every module of ``galore_plus.kernels`` against its reference; a kernel without a check fails."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return [failed("kernel", "triton is not installed (pip install triton)")]
    import galore_plus.kernels

    checks = []
    for module in pkgutil.iter_modules(galore_plus.kernels.__path__):
        if module.name == "dispatch":   # the choice between kernels and references, not a kernel
            continue
        importlib.import_module(f"galore_plus.kernels.{module.name}")
        if module.name not in KERNEL_CHECKS:
            checks.append(failed("kernel", f"{module.name}: no check in benchmarks/gpu_check.py"))
            continue
        checks.extend(KERNEL_CHECKS[module.name](device))
    return checks


# ---------------------------------------------------------------- 2, 3. the optimizer on CUDA against the CPU


@dataclass(frozen=True)
class OptimizerCase:
    name: str
    group: dict
    weight_dtype: torch.dtype = torch.float32
    optim_bits: int = 32


# A 64 x 48 weight of 4 heads of 16 rows. The randomized projector draws its sketch from a generator
# on the weight's device, whose numbers differ between CPU and CUDA; with rank + oversample = 48
# columns the sketch spans every direction, so both find the same top-8 subspace.
FULL_WIDTH_RANDOMIZED = dict(projector="randomized", oversample=40)
OPTIMIZER_CASES = [
    OptimizerCase("svd float32", dict(projector="svd")),
    OptimizerCase("randomized float32", FULL_WIDTH_RANDOMIZED),
    OptimizerCase("cross_head + exact residual float32",
                  dict(projector="cross_head", num_heads=4, residual_ratio=0.05, residual_warmup=2)),
    OptimizerCase("cross_head + paper residual float32",
                  dict(projector="cross_head", num_heads=4, residual_ratio=0.05, residual_warmup=2, residual_mode="paper")),
    OptimizerCase("svd bfloat16", dict(projector="svd"), torch.bfloat16),
    OptimizerCase("cross_head + exact residual bfloat16",
                  dict(projector="cross_head", num_heads=4, residual_ratio=0.05, residual_warmup=2), torch.bfloat16),
    OptimizerCase("8-bit svd", dict(projector="svd"), optim_bits=8),
    OptimizerCase("8-bit randomized + exact residual", dict(FULL_WIDTH_RANDOMIZED, residual_ratio=0.05, residual_warmup=2),
                  optim_bits=8),
]


@dataclass
class Run:
    """What one run of :func:`optimizer_run` leaves, everything on the CPU."""

    starts: list[torch.Tensor]
    one_basis: list[torch.Tensor]  # the parameters after step GAP, the last before the second refresh
    subspaces: list[torch.Tensor]  # the projected weight's basis as a projection matrix (P P^T or Q^T Q), every step
    final: list[torch.Tensor]


def optimizer_run(case: OptimizerCase, device: torch.device) -> Run:
    """STEPS steps on ``device`` of a projected 64 x 48 weight, a plain 48-value bias and a plain 64 x 64
    matrix (4096 values: 8-bit moments in the 8-bit cases), from seeded values and gradients."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 48), (48,), (64, 64)]
    starts = [(torch.randn(shape, generator=generator) * 0.02).to(case.weight_dtype) for shape in shapes]
    params = [torch.nn.Parameter(start.to(device, copy=True)) for start in starts]
    group = dict(rank=8, update_proj_gap=GAP, scale=SCALE, **case.group)
    optimizer = GaLorePlusAdamW([{"params": params[:1], **group}, {"params": params[1:]}], lr=LR, weight_decay=0.1,
                                optim_bits=case.optim_bits)
    one_basis, subspaces = [], []
    for step in range(1, STEPS + 1):
        for param, shape in zip(params, shapes):
            param.grad = torch.randn(shape, generator=generator).to(device=device, dtype=case.weight_dtype)
        optimizer.step()
        basis = optimizer.state[params[0]]["projector"].to("cpu", copy=True)
        subspaces.append(basis @ basis.t() if basis.shape[0] > basis.shape[1] else basis.t() @ basis)
        if step == GAP:
            one_basis = [p.detach().to("cpu", copy=True) for p in params]
    return Run(starts, one_basis, subspaces, [p.detach().cpu() for p in params])


def compare_runs(case: OptimizerCase, device: torch.device) -> list[Check]:
    """The run on ``device`` against the same run on the CPU.

    Parameters are compared after step GAP, before the second refresh: a singular vector's sign is
    arbitrary and CPU and CUDA decompositions may choose differently; the moments carried across a
    refresh are coordinates in the basis, so after a second refresh two correct runs part. What every
    refresh must agree on is the subspace, compared at every step; the final weights must be finite.
    """
    cpu, other = optimizer_run(case, torch.device("cpu")), optimizer_run(case, device)
    part = "8-bit" if case.optim_bits == 8 else "optimizer"
    checks = []
    steps = [LR * SCALE, LR, LR]  # one step's size: lr * scale for the projected weight, lr for plain tensors
    for name, start, expected, actual, step in zip(("weight", "bias", "plain 64x64"), cpu.starts, cpu.one_basis,
                                                    other.one_basis, steps):
        start, expected, actual = start.float(), expected.float(), actual.float()
        moved = float((expected - start).abs().mean())
        if moved <= step / 10:
            checks.append(failed(part, f"{case.name}: {name} did not move (mean {moved:.1e})"))
            continue
        difference = (actual - expected).abs()
        if case.optim_bits == 8:
            ratio = max(float(difference.mean()) / (0.01 * moved), float(difference.max()) / step)
        else:
            bound = 0.01 * step + 1e-5 * expected.abs()
            if case.weight_dtype == torch.bfloat16:
                bound = bound + spacing(expected, torch.bfloat16)
            ratio = float((difference / bound).max())
        checks.append(Check(part, f"{case.name}: {name} at t={GAP}", ratio, ratio <= 1.0))
    subspace_error = max(float((a - b).abs().max()) for a, b in zip(cpu.subspaces, other.subspaces))
    checks.append(Check(part, f"{case.name}: subspaces t=1..{STEPS}", subspace_error / SUBSPACE_ATOL,
                        subspace_error <= SUBSPACE_ATOL))
    finite = all(bool(torch.isfinite(p.float()).all()) for p in other.final)
    checks.append(Check(part, f"{case.name}: finite after t={STEPS}", 0.0 if finite else float("inf"), finite))
    return checks


def optimizer_checks(device: torch.device) -> list[Check]:
    """Every case of OPTIMIZER_CASES; a case that raises is reported as failed and the others still run."""
    checks = []
    for case in OPTIMIZER_CASES:
        try:
            checks.extend(compare_runs(case, device))
        except Exception as error:  # noqa: BLE001  (e.g. a bitsandbytes build without CUDA kernels)
            checks.append(failed("8-bit" if case.optim_bits == 8 else "optimizer", f"{case.name}: raised {error!r}"))
    return checks


# ---------------------------------------------------------------- 4. speed of the one-pass weight update

UPDATE_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # LLaMA-2-7B's projected weights


def weight_update_speed(device: torch.device, shapes: tuple[tuple[int, int], ...] = UPDATE_SHAPES, rank: int = 128,
                        repeats: int = 20) -> list[str]:
    """One line per shape: a bfloat16 weight's update with both of Fira's terms (f G + P X), the torch row-block
    path (``galore_plus.step.apply.apply_update``) against the one-pass kernel, and the product P X alone, one run."""
    from galore_plus.kernels.weight_update import apply_update_triton
    from galore_plus.step.apply import LowRankTerm, ScaledGradient, apply_update

    from .measure import mean_seconds

    def seconds_per_call(function: Callable[[], object]) -> float:
        """Mean time over ``repeats`` calls after two untimed ones."""
        function()
        function()
        return mean_seconds(function, repeats, device)

    lines = []
    finite = torch.tensor(True, device=device)
    for m, n in shapes:
        side = "right" if m >= n else "left"
        weight = (0.02 * torch.randn(m, n, device=device)).bfloat16()
        grad = (1e-3 * torch.randn(m, n, device=device)).bfloat16()
        basis = torch.randn((rank, n) if side == "right" else (m, rank), device=device)
        term = LowRankTerm(torch.randn((m, rank) if side == "right" else (rank, n), device=device), basis, side)
        gradient = ScaledGradient(grad, torch.rand((m, 1) if side == "right" else (1, n), device=device))
        left, right = term.rows(slice(None))
        product = torch.empty(m, n, device=device)
        reference = seconds_per_call(lambda: apply_update(weight, 1e-3, 0.999, finite, term, gradient))
        kernel = seconds_per_call(lambda: apply_update_triton(weight, 1e-3, 0.999, finite, term, gradient))
        alone = seconds_per_call(lambda: torch.mm(left, right, out=product))
        lines.append(f"weight update {m}x{n} r{rank} bfloat16: torch row blocks {reference * 1e3:.3f} ms, one-pass "
                     f"kernel {kernel * 1e3:.3f} ms ({reference / kernel:.2f}x), P X alone {alone * 1e3:.3f} ms")
    return lines


# ---------------------------------------------------------------- the command


def report(checks: list[Check]) -> bool:
    print(f"{'part':>10} {'case':<62} {'error/tolerance':>15}")
    for check in checks:
        print(check.line())
    return all(check.passed for check in checks)


def main(argv: list[str] | None = None) -> int:
    """Run every part this machine can run; return the exit status (0: all passed)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-bench", action="store_true", help="leave out part 4 (the step benchmark)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if not torch.cuda.is_available():
        print("No CUDA GPU on this machine: running the Triton kernels in the interpreter (TRITON_INTERPRET=1) "
              "on the CPU only; the optimizer, 8-bit and speed parts need a GPU and were not run.")
        use_triton_interpreter()
        passed = report(kernel_checks(torch.device("cpu")))
        print(f"kernels {'passed' if passed else 'FAILED'} in the interpreter, {time.perf_counter() - start:.0f} s")
        return 0 if passed else 1
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: the kernels would run in the interpreter, not compiled for the GPU; unset it")
        return 1
    device = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    passed = report(kernel_checks(device) + optimizer_checks(device))
    if not args.skip_bench:
        from .bench_step import main as bench_step

        for line in weight_update_speed(device):
            print(line)

        for layer in BENCH_LAYERS:
            bench_step(["--layer", layer, "--device", "cuda"])
    elapsed = time.perf_counter() - start
    print(f"{'all checks passed' if passed else 'SOME CHECKS FAILED'}, {elapsed:.0f} s"
          + (f" (over the {BUDGET_SECONDS} s budget)" if elapsed > BUDGET_SECONDS else ""))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
