"""When a weight's basis is refreshed: the fixed gap, or the adaptive one (group key ``adaptive_gap``).

Fixed (default): step t (from 1) refreshes when (t - 1) % ``update_proj_gap`` == 0; refresh k
(from 0) happens at step 1 + k * gap, and nothing is stored.

Adaptive (``adaptive_gap=True``, after Q-GaLore's lazy refresh): each weight keeps its own gap,
starting at ``update_proj_gap``. After every refresh the overlap of the new subspace with the old one,

    overlap = ||C||_F^2 / r   (C = Q_old Q_new^T or P_new^T P_old; 1 = same subspace, r/d = random),

is compared with ``gap_overlap_threshold``. After ``gap_patience`` refreshes in a row at or above it,
the weight's gap doubles (at most to ``max_update_proj_gap``; None means 8 * update_proj_gap) and
the count starts again; a refresh below the threshold resets the count. The gap never shrinks.
Q-GaLore compares only the first basis vector, by a signed cosine, averaged over its last 5
refreshes, and keeps doubling while that average stays high; the overlap here is invariant to the
sign and order of the basis vectors and covers the whole subspace.

The schedule is four ints in the weight's state (exact resume): ``refresh_gap``,
``next_refresh_step``, ``refresh_count`` and ``stable_refreshes``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor

from .moment_transfer import basis_change
from .shapes import Side

MAX_GAP_FACTOR = 8


@dataclass(frozen=True)
class RefreshSchedule:
    """One weight's adaptive schedule: its gap, the step of its next refresh, refreshes done, stable ones in a row."""

    gap: int
    next_step: int = 1
    count: int = 0
    stable: int = 0


def subspace_overlap(old: Tensor, new: Tensor, side: Side) -> Tensor:
    """||C||_F^2 / r for the bases ``old`` and ``new`` of the same side and rank (a 0-d device tensor)."""
    change = basis_change(old, new, side)
    return change.square().sum() / change.shape[0]


def fixed_refresh_count(step: int, gap: int) -> int:
    """Refreshes done by the end of step t under a fixed gap (0 before the first step)."""
    return 0 if step < 1 else (step - 1) // gap + 1


def max_gap(update_proj_gap: int, max_update_proj_gap: int | None) -> int:
    """The largest gap an adaptive schedule may reach."""
    return MAX_GAP_FACTOR * update_proj_gap if max_update_proj_gap is None else max_update_proj_gap


def after_refresh(
    schedule: RefreshSchedule, step: int, overlap: float | None, threshold: float, patience: int, largest_gap: int
) -> RefreshSchedule:
    """The schedule after a refresh at ``step`` whose subspace overlap is ``overlap`` (None: first basis)."""
    stable = schedule.stable + 1 if overlap is not None and overlap >= threshold else 0
    gap = schedule.gap
    if stable >= patience:
        gap, stable = min(2 * gap, largest_gap), 0
    return replace(schedule, gap=gap, next_step=step + gap, count=schedule.count + 1, stable=stable)


def schedule_from_state(state: dict, update_proj_gap: int) -> RefreshSchedule:
    """The weight's stored schedule, or a new one (gap ``update_proj_gap``, first refresh at step 1)."""
    if "refresh_gap" not in state:
        return RefreshSchedule(gap=update_proj_gap)
    return RefreshSchedule(state["refresh_gap"], state["next_refresh_step"], state["refresh_count"], state["stable_refreshes"])


def store_schedule(state: dict, schedule: RefreshSchedule) -> None:
    """Write the schedule into the weight's state as plain ints."""
    state["refresh_gap"] = schedule.gap
    state["next_refresh_step"] = schedule.next_step
    state["refresh_count"] = schedule.count
    state["stable_refreshes"] = schedule.stable


def overlap_value(old: Tensor | None, new: Tensor | None, side: Side) -> float | None:
    """The overlap as a Python float (one host read, on the refresh path only), or None without two bases."""
    if old is None or new is None or tuple(old.shape) != tuple(new.shape):
        return None
    return float(subspace_overlap(old, new, side))


def weight_refresh_count(state: dict, group: dict) -> int:
    """Refreshes a projected weight has done: from its adaptive schedule, or from its step count under a fixed gap."""
    if group["adaptive_gap"]:
        return state.get("refresh_count", 0)
    return fixed_refresh_count(state.get("step", 0), group["update_proj_gap"])
