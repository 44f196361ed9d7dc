"""Hydra against a hand-written dense float64 reference: outputs, gradients, merged weight and bias."""

import pytest
import torch
from torch import nn

from support import linear64, make_model, randomize_adapters
from galore_plus.adapters import HydraLinear, add_adapters, merge_adapters


def dense_hydra(W, b, parallel, sequential, scaling, x):
    """``h + s B_p A_p x + s B_s A_s h`` with ``h = W x + b``, and the merged weight and bias, from dense matrices."""
    (A_p, B_p), (A_s, B_s) = parallel, sequential
    h = x @ W.T + (0 if b is None else b)
    out = h + scaling * x @ (B_p @ A_p).T + scaling * h @ (B_s @ A_s).T
    merged_weight = W + scaling * B_p @ A_p + scaling * B_s @ A_s @ W
    merged_bias = None if b is None else b + scaling * B_s @ A_s @ b
    return out, merged_weight, merged_bias


@pytest.mark.parametrize("bias", [True, False])
def test_forward_gradients_and_merge_match_the_dense_reference(bias):
    layer = HydraLinear(linear64(6, 5, bias=bias), rank=2, alpha=5.0)
    randomize_adapters(layer, seed=4)
    x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    names = ["parallel_down", "parallel_up", "sequential_down", "sequential_up"]
    params = {name: getattr(layer, name).detach().clone().requires_grad_(True) for name in names}
    expected, weight, bias_ = dense_hydra(
        layer.base.weight, layer.base.bias, (params["parallel_down"], params["parallel_up"]),
        (params["sequential_down"], params["sequential_up"]), 2.5, x)
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    for name in names:
        grad = getattr(layer, name).grad
        assert grad.abs().max() > 1e-3, name
        torch.testing.assert_close(grad, params[name].grad, rtol=1e-10, atol=1e-12)
    merged = layer.merge()
    torch.testing.assert_close(merged.weight, weight.detach(), rtol=1e-10, atol=1e-12)
    if bias:
        torch.testing.assert_close(merged.bias, bias_.detach(), rtol=1e-10, atol=1e-12)
        assert not torch.allclose(merged.bias, layer.base.bias)  # the sequential branch moves the bias
    else:
        assert merged.bias is None
    torch.testing.assert_close(merged(x), expected.detach(), rtol=1e-10, atol=1e-12)


def test_both_branches_are_needed_to_match():
    layer = HydraLinear(linear64(6, 5), rank=2)
    randomize_adapters(layer, seed=4)
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        layer.sequential_up.zero_()
        parallel_only = layer(x)
    assert (full - parallel_only).abs().max() > 1e-2


def test_fresh_layer_is_the_base_layer():
    base = linear64(6, 5)
    layer = HydraLinear(base, rank=3)
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(layer.parallel_up) == 0 and torch.count_nonzero(layer.sequential_up) == 0
    assert layer.parallel_down.abs().min() > 0 and layer.sequential_down.shape == (3, 5)


def test_dropout_applies_to_each_branch_input_only_in_training():
    layer = HydraLinear(linear64(6, 5), rank=2, dropout=0.5)
    randomize_adapters(layer, seed=4)
    x = torch.randn(4, 6, dtype=torch.float64)
    layer.eval()
    reference = HydraLinear(linear64(6, 5), rank=2)
    reference.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), reference(x))
    layer.train()
    torch.manual_seed(0)
    assert (layer(x) - reference(x)).abs().max() > 1e-3


def test_merge_adapters_on_a_model():
    model = make_model()
    add_adapters(model, "hydra", rank=2, target_modules=["q_proj", "down"])
    randomize_adapters(model)
    tokens = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(3))
    expected = model(tokens)
    merge_adapters(model)
    assert type(model.down) is nn.Linear
    torch.testing.assert_close(model(tokens), expected, atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"layer 'block.up'.*rank must be between 1 and min\(in_features, out_features\) = 8"):
        add_adapters(make_model(), "hydra", rank=9, target_modules=["up"])
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        HydraLinear(nn.Linear(4, 4), rank=2, dropout=-0.1)
    with pytest.raises(TypeError, match="rank must be an int"):
        HydraLinear(nn.Linear(4, 4), rank=1.5)
