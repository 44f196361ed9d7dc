"""Projector refresh time and captured energy on LLaMA attention and MLP shapes.

    python -m benchmarks.bench_projectors                 # LLaMA-2-7B shapes, rank 128
    python -m benchmarks.bench_projectors --ranks 32 128 512 --models 7b 13b

Every method runs on the same synthetic gradient in one process; ratios are svd time / method
time. The gradient has a decaying spectrum (a rank-512 signal plus noise) so that the captured
energy, ||projection||^2 / ||G||^2 relative to the exact top-r SVD, means something; cross_head
is run on attention shapes only.

With bitsandbytes installed, two more columns give the energy kept by each basis stored in 4 bits
(``basis_bits=4``: NF4, blocks of 64, :mod:`galore_plus.state.basis_4bit`) relative to the same basis in
float32: ``4bit/fp32`` projects with the dequantised basis as the optimizer does (it is not
re-orthonormalised), ``4bit span`` measures the subspace it spans (after a QR).
"""

from __future__ import annotations

import argparse

import torch

from galore_plus.state.basis_4bit import dequantize_basis, quantize_basis
from galore_plus.group_options import projected_group_defaults
from galore_plus.projectors import PROJECTORS
from galore_plus.projectors.generators import basis_generator
from galore_plus.projectors.randomized import randomized_basis
from galore_plus.step.projection import project

from .measure import best_seconds

SHAPES = {
    "7b": [("q_proj", 4096, 4096, 32), ("up_proj", 11008, 4096, None)],
    "13b": [("q_proj", 5120, 5120, 40), ("up_proj", 13824, 5120, None)],
    "tiny": [("q_proj", 256, 256, 4)],
}


def synthetic_gradient(m: int, n: int, signal_rank: int = 512, seed: int = 0) -> torch.Tensor:
    """A gradient-like matrix: a decaying rank-``signal_rank`` signal plus 1% noise."""
    generator = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -2, signal_rank)
    signal = (torch.randn(m, signal_rank, generator=generator) * decay) @ torch.randn(signal_rank, n, generator=generator)
    return signal / signal.norm() + 0.01 * torch.randn(m, n, generator=generator) / (m * n) ** 0.5


def svd_lowrank_basis(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """torch.svd_lowrank with the same oversampling and power iterations as our default randomized."""
    u, _, v = torch.svd_lowrank(grad, q=rank + 8, niter=2)
    return u[:, :rank] if side == "left" else v[:, :rank].t()


def cross_head_basis(grad: torch.Tensor, rank: int, heads: int, generator: torch.Generator) -> torch.Tensor:
    """The optimizer's ``cross_head`` basis of ``grad`` (rows of the chosen heads, then their SVD), through the registry."""
    group = {**projected_group_defaults(), "rank": rank, "num_heads": heads}
    projector, shape = PROJECTORS["cross_head"], tuple(grad.shape)
    rows = projector.rows(group, shape, generator)
    return projector.basis(grad.index_select(0, rows), shape, group, "right", generator, None)


def energy(grad: torch.Tensor, basis: torch.Tensor, side: str) -> float:
    return float(project(grad, basis, side).square().sum() / grad.square().sum())


def orthonormalised(basis: torch.Tensor, side: str) -> torch.Tensor:
    """An orthonormal basis of the same span (QR), of the same side and shape."""
    return torch.linalg.qr(basis)[0] if side == "left" else torch.linalg.qr(basis.t())[0].t()


def four_bit_energies(grad: torch.Tensor, basis: torch.Tensor, side: str) -> tuple[float, float]:
    """(energy with the dequantised 4-bit basis, energy of its span), both relative to the float32 basis."""
    restored = dequantize_basis(*quantize_basis(basis), tuple(basis.shape))
    full = energy(grad, basis, side)
    return energy(grad, restored, side) / full, energy(grad, orthonormalised(restored, side), side) / full


def has_bitsandbytes() -> bool:
    try:
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["7b"], choices=sorted(SHAPES))
    parser.add_argument("--ranks", nargs="+", type=int, default=[128])
    parser.add_argument("--repeats", type=int, default=2, help="repeats of the fast methods (svd runs once)")
    args = parser.parse_args(argv)
    four_bit = has_bitsandbytes()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}"
          + ("" if four_bit else "; bitsandbytes not installed: no 4-bit columns"))
    print(f"{'shape':>26} {'rank':>5} {'method':>12} {'time ms':>10} {'svd/method':>11} {'energy vs svd':>14}"
          + (f" {'4bit/fp32':>10} {'4bit span':>10}" if four_bit else ""))
    for model in args.models:
        for name, m, n, heads in SHAPES[model]:
            grad = synthetic_gradient(m, n)
            side = "right" if m >= n else "left"
            svd_time, full = best_seconds(lambda: torch.linalg.svd(grad, full_matrices=False), 1)
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

                def quantised_columns(basis: torch.Tensor, basis_side: str) -> str:
                    return " ".join(f"{value:>10.4f}" for value in four_bit_energies(grad, basis, basis_side)) if four_bit else ""

                print(f"{label:>26} {rank:>5} {'svd':>12} {svd_time * 1e3:>10.1f} {1.0:>11.1f} {1.0:>14.4f} "
                      + quantised_columns(exact, side))
                for method, function in methods.items():
                    seconds, basis = best_seconds(function, args.repeats)
                    basis_side = "right" if method == "cross_head" else side
                    relative = energy(grad, basis, basis_side) / exact_energy
                    print(f"{label:>26} {rank:>5} {method:>12} {seconds * 1e3:>10.1f} {svd_time / seconds:>11.1f} {relative:>14.4f} "
                          + quantised_columns(basis, basis_side))


if __name__ == "__main__":
    main()
