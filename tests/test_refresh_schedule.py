"""Refresh schedules: the subspace overlap, the adaptive gap's doubling rule, its state round trip."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from galore_plus.step.weight_step import basis_schedule
from galore_plus.step.refresh_schedule import RefreshSchedule, after_refresh, fixed_refresh_count, max_gap, overlap_value, schedule_from_state, store_schedule, subspace_overlap


def orthonormal(size, rank, generator):
    return torch.linalg.qr(torch.randn(size, rank, generator=generator, dtype=torch.float64))[0]


@settings(max_examples=20, deadline=None, derandomize=True)
@given(d=st.integers(2, 12), data=st.data(), seed=st.integers(0, 2**16))
def test_overlap_equals_dense_projector_trace(d, data, seed):
    """||C||_F^2 / r = trace(P_old P_old^T P_new P_new^T) / r, in float64, on both sides."""
    rank = data.draw(st.integers(1, d))
    generator = torch.Generator().manual_seed(seed)
    old, new = orthonormal(d, rank, generator), orthonormal(d, rank, generator)
    want = torch.trace(old @ old.t() @ new @ new.t()) / rank
    torch.testing.assert_close(subspace_overlap(old, new, "left"), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(subspace_overlap(old.t(), new.t(), "right"), want, rtol=1e-10, atol=1e-12)


def test_overlap_is_one_for_the_same_subspace_and_zero_for_orthogonal_ones():
    generator = torch.Generator().manual_seed(0)
    basis = orthonormal(10, 6, generator)
    rotated = basis[:, :3] @ torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))[0]
    assert abs(float(subspace_overlap(basis[:, :3], rotated, "left")) - 1) < 1e-12
    assert abs(float(subspace_overlap(basis[:, :3], basis[:, 3:], "left"))) < 1e-12
    assert overlap_value(None, basis, "left") is None
    assert overlap_value(basis[:, :2], basis[:, :3], "left") is None


def test_gap_doubles_after_patience_stable_refreshes_in_a_row_up_to_the_maximum():
    schedule = RefreshSchedule(gap=10)
    schedule = after_refresh(schedule, 1, None, 0.5, 2, 40)
    assert schedule == RefreshSchedule(gap=10, next_step=11, count=1, stable=0)
    schedule = after_refresh(schedule, 11, 0.9, 0.5, 2, 40)
    assert (schedule.gap, schedule.next_step, schedule.stable) == (10, 21, 1)
    schedule = after_refresh(schedule, 21, 0.3, 0.5, 2, 40)                    # unstable: count restarts
    assert (schedule.gap, schedule.next_step, schedule.stable) == (10, 31, 0)
    schedule = after_refresh(schedule, 31, 0.6, 0.5, 2, 40)
    schedule = after_refresh(schedule, 41, 0.5, 0.5, 2, 40)                    # at the threshold counts as stable
    assert (schedule.gap, schedule.next_step, schedule.stable, schedule.count) == (20, 61, 0, 5)
    for step in (61, 81):
        schedule = after_refresh(schedule, step, 0.99, 0.5, 2, 40)
    assert (schedule.gap, schedule.next_step) == (40, 121)
    for step in (121, 161):
        schedule = after_refresh(schedule, step, 0.99, 0.5, 2, 40)
    assert (schedule.gap, schedule.next_step) == (40, 201)                     # capped


def test_unstable_subspace_keeps_the_fixed_schedule():
    schedule = RefreshSchedule(gap=7)
    steps = []
    for _ in range(6):
        steps.append(schedule.next_step)
        schedule = after_refresh(schedule, schedule.next_step, 0.1, 0.5, 1, 56)
    fixed = {"adaptive_gap": False, "update_proj_gap": 7}
    assert steps == [t for t in range(1, 40) if basis_schedule({}, fixed, t)[1]]
    assert schedule.count == fixed_refresh_count(36, 7) == 6


def test_schedule_state_round_trip_is_plain_ints():
    state = {}
    assert schedule_from_state(state, 12) == RefreshSchedule(gap=12)
    schedule = RefreshSchedule(gap=24, next_step=50, count=3, stable=1)
    store_schedule(state, schedule)
    assert all(type(value) is int for value in state.values())
    assert schedule_from_state(state, 12) == schedule


def test_default_maximum_is_eight_times_the_gap():
    assert max_gap(200, None) == 1600
    assert max_gap(200, 500) == 500
