"""Norm-scaled full-rank residual (Fira, Chen et al. 2024): group keys ``full_rank_residual`` and ``norm_growth_limit``.

GaLore's update P N (or N Q) drops the part of the gradient outside the subspace. Fira adds it back,
scaled like Adam would scale it. Along the dimension that is not projected (column j on the output
side, row i on the input side) the scaling is the ratio of the Adam direction's norm to the
low-rank gradient's norm over the rank dimension:

    phi_j = ||N[:, j]|| / (||R[:, j]|| + 1e-8)        (output side; input side: rows N[i, :], R[i, :])
    S = phi * (G - alpha P R)                         (input side: G - alpha R Q)
    U = alpha P N + S                                 (input side: alpha N Q + S)

``alpha`` is the group's ``scale``. This is the update of the ``fira`` package's ``FiraAdamW``
(its ``alpha``), whose projector multiplies both back-projections by ``alpha``: at ``alpha < 1`` the
residual S therefore also carries (1 - alpha) phi P R, a norm-scaled copy of the in-subspace
gradient, and enters at full size, not multiplied by ``alpha``. On the main job this convention
beat the two alternatives we measured, alpha (P N + phi (G - P R)) and alpha P N + phi (G - P R),
by about 0.05 nats/byte each (docs/levers.md). With ``scale="auto"`` (see
:mod:`galore_plus.rules.auto_scale`) U is formed at alpha = 1 and then rescaled as a whole.

Norm-growth limiter (``norm_growth_limit`` gamma, default 1.01; ``None`` disables it): with s_t the
norm of S at step t, measured without Adam's bias-correction factor sqrt(1 - b2^t) / (1 - b1^t) (as
Fira measures it, so the warm-up of the bias correction is not mistaken for growth), S is divided by
max(s_t / (s_{t-1} + 1e-8), gamma) / gamma, and the stored s_t is the limited norm. The first step
stores s_1 without limiting. The state is that one float per weight. For a weight sharded by rows
(FSDP2) the norm is the whole weight's: ``norm`` sums the squares over every rank.

How it is computed (no full-size tensor is formed, and G may be bfloat16):

    c = phi / divisor,  X = alpha (N - c R)   gives   U = c G + P X   (input side: c G + X Q)

because P (c R) = c (P R) when c scales columns (and (c R) Q = c (R Q) when it scales rows); it is
applied a block of rows at a time (:func:`galore_plus.step.apply.apply_update`, one ``addcmul_`` and one
``addmm_`` per block). The limiter's norm ||S||^2 = sum_j phi_j^2 ||G_j - alpha P R_j||^2 needs no
back-projection either: with g_j = ||G_j||^2 (one blocked pass over G,
:func:`galore_plus.step.row_blocks.channel_square_sums`), R_j = P^T G_j and M = P^T P (r x r),

    ||c G_j + P X_j||^2 = c^2 g_j + 2 c X_j . R_j + X_j . (M X_j)          (:func:`weighted_square_total`)

(c = 1, X = -alpha R for the residual; the input side likewise per row with M = Q Q^T). So a step costs
two rank-r products (R and P X), as GaLore's does, where forming S would cost a third and several
full-size temporaries. The small terms are float64, so the difference loses only what its float32
inputs carry: G's squares (float32 sums of a block of rows) and R (a float32 product) differ from the
exact values by dg_j and dR_j, and the norm's square by sum_j w_j (dg_j + 2 X_j . dR_j), at most
gamma_m sum_j w_j (g_j + 2 |X_j| . |P|^T |G_j|) (gamma_m = m u / (1 - m u), u = 2^-24, in any order of
summation): relative to ||S||^2, some gamma_m / share in the worst case, share being S's part of G's
energy; errors of either sign average out far below it (docs/levers.md has measurements against a
1.01 growth limit; tests/test_full_rank_residual.py checks this budget). For a sharded weight every
process adds the terms of its own rows (``total``; on the left side R_j is the sum over ranks, the
process's own P^T G_j multiplies it, and P^T P is summed over ranks first), which sum to the whole
weight's.

Remaining differences from ``FiraAdamW``, all conventions: it adds eps to sqrt(V) before bias
correction and decays weights after the update, not before. With eps = 0 and no weight decay the
updates are equal at any alpha (``tests/test_full_rank_residual.py``, ``tests/test_levers.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..group_keys import GroupKey, Problem, boolean, finite_number
from ..state.tensors import StateTensor, per_matrix_scalar
from ..step.apply import LowRankTerm
from ..step.layouts import single_process_total
from ..step.shapes import Shape, Side
from ..step.stacks import matrix_sum
from .norms import Total, channel_norm_ratio, norm_growth_divisor


def weighted_square_total(
    grad_squares: Tensor, weights: Tensor | float, factor: Tensor | float, low_rank: LowRankTerm, own_low_rank: Tensor,
    total: Total = single_process_total,
) -> Tensor:
    """sum_j w_j ||c_j G_j + (P X | X Q)_j||^2 over the channels of the whole weight (columns j on the left side,
    rows on the right), a float64 0-d tensor (one per expert, (E, 1, 1), for a stack); the matrix is never formed.

    ``grad_squares``: G's per-channel sums of squares over this process's rows
    (:func:`~galore_plus.step.row_blocks.channel_square_sums`); ``weights`` w and ``factor`` c: numbers, 0-d or
    one value per channel; ``low_rank``: X and the basis (P, this process's rows | Q); ``own_low_rank``:
    R_own = P^T G | G Q^T of this process's rows; ``total``: the sum over processes. Per channel,

        ||c G_j + P X_j||^2 = c^2 g_j + 2 c X_j . R_own,j + X_j . (M X_j),   M = P^T P | Q Q^T,

    exact algebra whose rounding matters only when the terms nearly cancel, so it is float64, except
    X . ((M - I) X), which is small for an orthonormal basis (float32, against a float64 M). Every
    process adds the terms of its own rows (on the left side its rows' part of R); on the left side,
    where P's rows are split over processes and X is whole on each, M is first summed over processes
    (with the other terms, in one ``total``), so M - I is small there too.
    """
    left = low_rank.side == "left"
    dim = -2 if left else -1
    weights = weights.double() if isinstance(weights, Tensor) else weights
    factor = factor.double() if isinstance(factor, Tensor) else factor
    gram = _gram(low_rank)
    linear = matrix_sum(weights * _linear_terms(grad_squares, factor, low_rank, own_low_rank))
    if not left:
        return total(linear + matrix_sum(weights * _quadratic_terms(low_rank.low_rank, gram, dim)))
    summed = total(torch.cat([linear.reshape(-1), gram.flatten()]))
    count = linear.numel()
    quadratic = _quadratic_terms(low_rank.low_rank, summed[count:].view_as(gram), dim)
    return summed[:count].view_as(linear) + matrix_sum(weights * quadratic)


def channel_square_terms(grad_squares: Tensor, factor: Tensor | float, low_rank: LowRankTerm,
                         own_low_rank: Tensor) -> Tensor:
    """||c_j G_j + (P X | X Q)_j||^2 of a weight held whole by this process, one float64 value per channel ((1, n)
    on the left side, (m, 1) on the right): the terms :func:`weighted_square_total` weights and sums."""
    dim = -2 if low_rank.side == "left" else -1
    factor = factor.double() if isinstance(factor, Tensor) else factor
    return (_linear_terms(grad_squares, factor, low_rank, own_low_rank)
            + _quadratic_terms(low_rank.low_rank, _gram(low_rank), dim))


def _gram(low_rank: LowRankTerm) -> Tensor:
    """M = P^T P | Q Q^T of this process's basis rows, float64."""
    basis = low_rank.basis.double()
    return basis.mT @ basis if low_rank.side == "left" else basis @ basis.mT


def _linear_terms(grad_squares: Tensor, factor: Tensor | float, low_rank: LowRankTerm, own_low_rank: Tensor) -> Tensor:
    """c_j^2 g_j + 2 c_j X_j . R_own,j per channel, float64."""
    dim = -2 if low_rank.side == "left" else -1
    cross = (low_rank.low_rank.double() * own_low_rank.double()).sum(dim, keepdim=True)
    return factor * factor * grad_squares + 2 * factor * cross


def _quadratic_terms(narrow: Tensor, gram: Tensor, dim: int) -> Tensor:
    """X_j . (M X_j) per channel (along ``dim``, per matrix of a stack) as ||X_j||^2 in float64 plus
    X_j . ((M - I) X_j) in X's dtype, which loses nothing for a near-orthonormal basis (M - I small) and needs no
    float64 m x r x r product."""
    deviation = (gram - torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)).to(narrow.dtype)
    deviation_term = narrow * (deviation @ narrow if dim == -2 else narrow @ deviation)
    return narrow.double().square().sum(dim, keepdim=True) + deviation_term.sum(dim, keepdim=True).double()


def fira_update(
    grad_squares: Tensor, low_rank: Tensor, own_low_rank: Tensor, direction: Tensor, basis: Tensor, side: Side,
    alpha: float, previous_norm: Tensor | None, limit: float | None, bias_factor: float,
    total: Total = single_process_total,
) -> tuple[Tensor, LowRankTerm, Tensor]:
    """(c, X as a :class:`~galore_plus.step.apply.LowRankTerm`, the norm to store): U = c G + (P X | X Q) is
    the whole update before lr, S limited (module docstring). Low-rank arithmetic only.

    ``grad_squares``: G's per-channel sums of squares over this process's rows; ``low_rank`` R (summed
    over ranks); ``own_low_rank``: this process's part of R (R itself in a single process);
    ``basis``: P (this process's rows) | Q; ``previous_norm``: the stored norm of the last step (None
    or +inf on the first: no limiting); ``bias_factor``: :func:`~galore_plus.rules.norms.adam_bias_factor` of this step;
    ``total``: the sum over processes. Runs on the device: no value is read to the host.
    """
    phi = channel_norm_ratio(direction, low_rank, side)
    squares = weighted_square_total(grad_squares, phi.square(), 1.0, LowRankTerm(-alpha * low_rank, basis, side),
                                    own_low_rank, total)
    measured = squares.clamp(min=0).sqrt().to(low_rank.dtype) / bias_factor
    divisor = norm_growth_divisor(measured, previous_norm, limit)
    factor = phi / divisor
    return factor, LowRankTerm(alpha * (direction - factor * low_rank), basis, side), measured / divisor


def growth_limit_problem(value: Any) -> Problem:
    """Why ``value`` is not a valid ``norm_growth_limit`` (None, or a finite number >= 1), or None."""
    if value is None:
        return None
    problem = finite_number(value)
    if problem is None and value < 1.0:
        return ValueError, f"must be >= 1 (or None to disable the limiter), got {value!r}"
    return problem


FIRA_KEYS: dict[str, GroupKey] = {
    # None (or unset): the projector's default (Projector.rule_defaults), else off.
    "full_rank_residual": GroupKey(False, boolean, unset_when_none=True),
    "norm_growth_limit": GroupKey(1.01, growth_limit_problem),
}
# State keys: the limiter's norm s_t (one per matrix), and under per-layer accumulation ||N|| per channel of the
# previous boundary (:mod:`galore_plus.step.accumulate`).
NORM_KEY = "residual_norm"
ACCUMULATION_FACTOR_KEY = "accumulation_factor"


def _channels(shape: Shape, group: dict, side: Side) -> Shape:
    return (1, shape[-1]) if side == "left" else (shape[-2], 1)


FIRA_STATE: dict[str, StateTensor] = {
    NORM_KEY: StateTensor(per_matrix_scalar, kept=lambda group, bits, accumulation: group["full_rank_residual"]),
    ACCUMULATION_FACTOR_KEY: StateTensor(
        _channels, kept=lambda group, bits, accumulation: group["full_rank_residual"] and accumulation),
}
