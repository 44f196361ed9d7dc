"""scale="auto": the update's per-entry RMS equals the low-rank Adam direction's."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from galore_plus.rules.auto_scale import lowrank_auto_scale, rms_matching_scale
from galore_plus.step.projection import project_back


def rms(tensor: torch.Tensor) -> torch.Tensor:
    """Root mean square of all entries (the optimizer computes it from square sums over processes)."""
    return torch.linalg.vector_norm(tensor) / math.sqrt(tensor.numel())


@settings(max_examples=20, deadline=None, derandomize=True)
@given(m=st.integers(2, 40), n=st.integers(2, 40), data=st.data(), side=st.sampled_from(["left", "right"]),
       seed=st.integers(0, 2**16))
def test_shape_formula_gives_the_backprojected_direction_the_direction_rms(m, n, data, side, seed):
    rank = data.draw(st.integers(1, min(m, n)))
    generator = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(m if side == "left" else n, rank, generator=generator, dtype=torch.float64))[0]
    basis = q if side == "left" else q.t()
    direction = torch.randn((rank, n) if side == "left" else (m, rank), generator=generator, dtype=torch.float64)
    update = project_back(direction, basis, side)
    scale = lowrank_auto_scale((m, n), rank, side)
    torch.testing.assert_close(rms(scale * update), rms(direction), rtol=1e-10, atol=0)
    torch.testing.assert_close(rms_matching_scale(rms(direction), rms(update)), torch.tensor(scale, dtype=torch.float64),
                               rtol=1e-10, atol=0)


def test_rms_matching_scale_of_a_whole_update():
    direction = torch.full((2, 3), 2.0)                     # RMS 2
    update = torch.full((4, 3), 0.5)                        # RMS 0.5
    assert float(rms_matching_scale(rms(direction), rms(update))) == 4.0
    assert float(rms_matching_scale(rms(direction), torch.tensor(0.0))) == 0.0
    assert math.isclose(lowrank_auto_scale((64, 16), 4, "left"), 4.0)
    assert math.isclose(lowrank_auto_scale((64, 16), 4, "right"), 2.0)
