"""Moment transfer at a basis refresh: Adam's moments re-expressed in the new basis (group key ``moment_transfer``).

GaLore keeps the low-rank moments M, V unchanged when the basis changes, so after a refresh their
coordinates refer to the old directions. With ``moment_transfer=True`` they are mapped instead by
the change of coordinates C between the two bases (r x r):

* input side (``"right"``, Q of shape (r, n), M of shape (m, r)):  C = Q_old Q_new^T,  M <- M C
* output side (``"left"``, P of shape (m, r), M of shape (r, n)):  C = P_new^T P_old,  M <- C M

This is exact for the part of the full-size first moment (M Q_old or P_old M) that lies in both
subspaces; the part outside the new subspace is dropped, and new directions start with no momentum.

The second moment is a per-coordinate variance. Modelling each row (column) of the full-size
gradient as independent coordinates along the old basis vectors with variances V, plus an isotropic
part with the mean of those variances outside the old subspace, the variance along a new basis
vector j is

    V'_j = sum_k C_kj^2 V_k + (1 - sum_k C_kj^2) mean_k(V_k)

(``"left"``: the same with C^T, per column). The first term alone (V (C * C)) would leave a new
direction with almost no variance, so its first Adam steps would be far larger than Adam's; the
second term gives it the average variance instead (measured on a tiny LLaMA this did not beat
V (C * C) or keeping the moments; docs/levers.md). sum_k C_kj^2 is the squared length of the new
basis vector inside the old subspace, at most 1 (up to rounding, clamped).

Adam's bias-correction step count continues unchanged. A stack of matrices (E, ...) transfers each
expert's moments with its own C, batched.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .shapes import Side


def basis_change(old: Tensor, new: Tensor, side: Side) -> Tensor:
    """C (r x r): Q_old Q_new^T on the input side, P_new^T P_old on the output side."""
    return old @ new.mT if side == "right" else new.mT @ old


def transfer_exp_avg(exp_avg: Tensor, change: Tensor, side: Side) -> Tensor:
    """First moment in the new basis: M C (input side) or C M (output side)."""
    return exp_avg @ change if side == "right" else change @ exp_avg


def transfer_exp_avg_sq(exp_avg_sq: Tensor, change: Tensor, side: Side) -> Tensor:
    """Second moment in the new basis (module docstring): V (C*C) plus the mean of V for the part of
    each new direction outside the old subspace."""
    weights = change.square()
    if side == "right":
        outside = (1 - weights.sum(-2, keepdim=True)).clamp_(min=0)
        return exp_avg_sq @ weights + exp_avg_sq.mean(-1, keepdim=True) * outside
    outside = (1 - weights.sum(-1, keepdim=True)).clamp_(min=0)
    return weights @ exp_avg_sq + outside * exp_avg_sq.mean(-2, keepdim=True)


def transfer_moments(
    exp_avg: Tensor, exp_avg_sq: Tensor, old: Tensor, new: Tensor, side: Side
) -> tuple[Tensor, Tensor]:
    """(M, V) re-expressed from basis ``old`` to basis ``new`` of the same side and rank."""
    change = basis_change(old, new, side)
    return transfer_exp_avg(exp_avg, change, side), transfer_exp_avg_sq(exp_avg_sq, change, side)


def transfer_moments_at_refresh(
    exp_avg: Tensor, exp_avg_sq: Tensor, previous: Tensor, basis: Tensor, side: Side,
    state: dict[str, Any], group: dict[str, Any],
) -> None:
    """The refresh hook of :mod:`galore_plus.step.weight_step`: with ``moment_transfer``, move this process's
    moments (written in place) from the basis ``previous`` to ``basis``; nothing when the refresh kept the basis."""
    if not group["moment_transfer"] or previous is basis:
        return
    moved_avg, moved_avg_sq = transfer_moments(exp_avg, exp_avg_sq, previous, basis, side)
    exp_avg.copy_(moved_avg)
    exp_avg_sq.copy_(moved_avg_sq)
