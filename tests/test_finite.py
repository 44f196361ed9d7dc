"""all_finite: one device-side flag for several tensors, against torch.isfinite element by element."""

import pytest
import torch

from galore_plus.step.finite import all_finite


def tensors(seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=generator), torch.randn(7, generator=generator), torch.randn(2, 2, 2, generator=generator)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_one_non_finite_element_in_any_tensor_makes_it_false(bad, where):
    values = tensors(where)
    assert bool(all_finite(*values))
    values[where].view(-1)[3] = bad
    flag = all_finite(*values)
    assert flag.dim() == 0 and flag.dtype == torch.bool
    assert not bool(flag)
    assert bool(flag) == all(bool(torch.isfinite(value).all()) for value in values)


def test_plus_and_minus_infinity_do_not_cancel():
    assert not bool(all_finite(torch.tensor([float("inf"), -float("inf")])))
    assert not bool(all_finite(torch.tensor([float("inf")]), torch.tensor([-float("inf")])))


def test_finite_values_whose_float32_sum_overflows_are_finite():
    huge = torch.full((1000,), 3e38)
    assert not torch.isfinite(huge.sum())  # float32 would call it non-finite
    assert bool(all_finite(huge, -huge, huge))


def test_a_single_tensor():
    assert bool(all_finite(torch.zeros(4)))
    assert not bool(all_finite(torch.tensor([1.0, float("nan")])))
