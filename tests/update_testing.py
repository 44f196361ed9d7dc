"""Shared test helper: the terms of a weight update (galore_plus.step.apply), drawn from a generator."""

import torch

from galore_plus.step.apply import LowRankTerm, ScaledGradient


def terms_of(m, n, rank, side, factor_kind, grad_dtype, generator):
    """A low-rank term, a scaled gradient (factor 0-d, per row or per column) and their float64 sum."""
    basis = torch.randn((m, rank) if side == "left" else (rank, n), generator=generator)
    low_rank = torch.randn((rank, n) if side == "left" else (m, rank), generator=generator) / rank**0.5
    grad = torch.randn(m, n, generator=generator).to(grad_dtype)
    factor = {"tensor": torch.tensor(0.7), "row": torch.rand(m, 1, generator=generator) + 0.5,
              "column": torch.rand(1, n, generator=generator) + 0.5}[factor_kind]
    term = LowRankTerm(low_rank, basis, side)
    back = basis.double() @ low_rank.double() if side == "left" else low_rank.double() @ basis.double()
    return term, ScaledGradient(grad, factor), back, factor.double() * grad.double()
