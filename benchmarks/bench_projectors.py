"""Projector refresh time and captured energy on LLaMA attention and MLP shapes.

    python -m benchmarks.bench_projectors                 # LLaMA-2-7B shapes, rank 128
    python -m benchmarks.bench_projectors --ranks 32 128 512 --models 7b 13b

Every method runs on the same synthetic gradient in one process; ratios are svd time / method
time. The gradient has a decaying spectrum (a rank-512 signal plus noise) so that the captured
energy, ||projection||^2 / ||G||^2 relative to the exact top-r SVD, means something; cross_head
is run on attention shapes only.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from galore_plus.projectors import basis_generator, cross_head_basis, project, randomized_basis, svd_basis

SHAPES = {
    "7b": [("q_proj", 4096, 4096, 32), ("up_proj", 11008, 4096, None)],
    "13b": [("q_proj", 5120, 5120, 40), ("up_proj", 13824, 5120, None)],
}


def synthetic_gradient(m: int, n: int, signal_rank: int = 512, seed: int = 0) -> torch.Tensor:
    """A gradient-like matrix: a decaying rank-``signal_rank`` signal plus 1% noise."""
    generator = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -2, signal_rank)
    signal = (torch.randn(m, signal_rank, generator=generator) * decay) @ torch.randn(signal_rank, n, generator=generator)
    return signal / signal.norm() + 0.01 * torch.randn(m, n, generator=generator) / (m * n) ** 0.5


def timed(function: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    """Best wall time of ``repeats`` calls (seconds) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def svd_lowrank_basis(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """torch.svd_lowrank with the same oversampling and power iterations as our default randomized."""
    u, _, v = torch.svd_lowrank(grad, q=rank + 8, niter=2)
    return u[:, :rank] if side == "left" else v[:, :rank].t()


def energy(grad: torch.Tensor, basis: torch.Tensor, side: str) -> float:
    return float(project(grad, basis, side).square().sum() / grad.square().sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["7b"], choices=sorted(SHAPES))
    parser.add_argument("--ranks", nargs="+", type=int, default=[128])
    parser.add_argument("--repeats", type=int, default=2, help="repeats of the fast methods (svd runs once)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'shape':>26} {'rank':>5} {'method':>12} {'time ms':>10} {'svd/method':>11} {'energy vs svd':>14}")
    for model in args.models:
        for name, m, n, heads in SHAPES[model]:
            grad = synthetic_gradient(m, n)
            side = "right" if m >= n else "left"
            svd_time, full = timed(lambda: torch.linalg.svd(grad, full_matrices=False), 1)
            for rank in args.ranks:
                exact = full[2][:rank] if side == "right" else full[0][:, :rank]
                exact_energy = energy(grad, exact, side)
                generator = lambda: basis_generator(0, 0, 0, grad.device)  # noqa: E731
                methods = {
                    "svd_lowrank": lambda: svd_lowrank_basis(grad, rank, side),
                    "randomized": lambda: randomized_basis(grad, rank, side, generator()),
                }
                if heads is not None:
                    methods["cross_head"] = lambda: cross_head_basis(grad, rank, heads, generator())
                label = f"{model} {name} {m}x{n}"
                print(f"{label:>26} {rank:>5} {'svd':>12} {svd_time * 1e3:>10.1f} {1.0:>11.1f} {1.0:>14.4f}")
                for method, function in methods.items():
                    seconds, basis = timed(function, args.repeats)
                    relative = energy(grad, basis, "right" if method == "cross_head" else side) / exact_energy
                    print(f"{label:>26} {rank:>5} {method:>12} {seconds * 1e3:>10.1f} {svd_time / seconds:>11.1f} {relative:>14.4f}")


if __name__ == "__main__":
    main()
