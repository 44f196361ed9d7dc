"""``scale="auto"``: choose the update's scale so that a user can keep the learning rate that worked for AdamW.

Adam's direction has entries of a typical size (its per-entry RMS); AdamW's update is lr times it.
The low-rank Adam direction N (r x n or m x r) has entries of about that size too, but its
back-projection P N (m x n) spreads the same Frobenius norm (P is orthonormal) over d / r times as
many entries, d being the projected dimension, so its per-entry RMS is sqrt(r / d) of N's. The
automatic scale makes the per-entry RMS of the whole update equal to N's:

* GaLore update U = P N:                        scale = sqrt(d / r) (a constant of the shape);
* with the full-rank residual, U = P N + S:     scale = RMS(N) / RMS(U), computed every step on the device
  (over every process's rows of a sharded weight).
  U is never formed whole: its norm comes from G's per-channel square sums and low-rank terms
  (:func:`galore_plus.rules.fira.weighted_square_total`), no extra full-size work.

The entries of the sparse residual (``residual_ratio``) are Adam updates of the full gradient
already, so with ``scale="auto"`` they use scale 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..step.shapes import Side

AUTO = "auto"


def lowrank_auto_scale(shape: tuple[int, ...], rank: int, side: Side) -> float:
    """sqrt(d / r), d the projected dimension of an (m, n) weight (m on the output side, n on the input side)."""
    projected = shape[-2] if side == "left" else shape[-1]
    return math.sqrt(projected / rank)


def rms_matching_scale(direction_rms: Tensor, update_rms: Tensor) -> Tensor:
    """RMS(N) / RMS(U): the scale that gives a full-size update U of per-entry RMS ``update_rms`` the per-entry RMS
    ``direction_rms`` of the direction N.

    A zero update gets scale 0 (nothing to scale) instead of a division by zero.
    """
    tiny = torch.finfo(update_rms.dtype).tiny
    return torch.where(update_rms > 0, direction_rms / update_rms.clamp(min=tiny), 0.0)


def residual_scale(scale: float | str) -> float:
    """The scale of the sparse residual's entries: 1 under ``"auto"`` (they are Adam updates already), else ``scale``."""
    return 1.0 if scale == AUTO else scale
