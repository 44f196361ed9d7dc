"""DVoRA against a hand-written dense float64 reference: outputs, gradients, merged weight, initialisation."""

import pytest
import torch
from torch import nn

from support import linear64, make_model, randomize_adapters, tokens
from galore_plus.adapters import DVoRALinear, VeRALinear, VeRAProjections, add_adapters


def dense_dvora(W, b, A, B, lambda_d, lambda_b, magnitude, scaling, x):
    """``m / ||W + s Λ_b B Λ_d A||_c * (W + s Λ_b B Λ_d A) x + b`` with the row norm detached, from dense matrices."""
    V = W + scaling * torch.diag(lambda_b) @ B @ torch.diag(lambda_d) @ A
    norm = V.detach().norm(dim=1, keepdim=True)
    merged = magnitude.unsqueeze(1) * V / norm
    return x @ merged.T + b, merged


def test_forward_gradients_and_merge_match_the_dense_reference():
    layer = DVoRALinear(linear64(6, 5), rank=3, alpha=4.5, seed=2)
    randomize_adapters(layer, seed=4)
    x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    params = {name: p.detach().clone().requires_grad_(True) for name, p in
              [("lambda_d", layer.lambda_d), ("lambda_b", layer.lambda_b), ("magnitude", layer.magnitude)]}
    expected, merged = dense_dvora(layer.base.weight, layer.base.bias, layer.projections.A, layer.projections.B,
                                   params["lambda_d"], params["lambda_b"], params["magnitude"], 1.5, x)
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    for name, reference in params.items():
        grad = getattr(layer, name).grad
        assert grad.abs().max() > 1e-3, name  # every trainable vector is reached by the gradient
        torch.testing.assert_close(grad, reference.grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(layer.merged_weight(), merged, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.merge()(x), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.merged_weight().norm(dim=1), layer.magnitude.abs(), rtol=1e-10, atol=0)


def test_fresh_layer_is_the_base_layer_with_the_weight_norm_as_magnitude():
    base = linear64(6, 5)
    layer = DVoRALinear(base, rank=3)
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(layer.magnitude.detach(), base.weight.detach().norm(dim=1))
    assert torch.all(layer.lambda_b == 0) and torch.all(layer.lambda_d == 0.1)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-12, atol=1e-12)
    names = [n for n, _ in layer.named_parameters() if not n.startswith("base.")]
    assert sorted(names) == ["lambda_b", "lambda_d", "magnitude"]


def test_differs_from_vera_by_the_magnitude_only():
    base = linear64(6, 5)
    vera, dvora = VeRALinear(base, rank=3, seed=1), DVoRALinear(linear64(6, 5), rank=3, seed=1)
    randomize_adapters(vera, seed=5)
    with torch.no_grad():
        dvora.lambda_d.copy_(vera.lambda_d)
        dvora.lambda_b.copy_(vera.lambda_b)
        direction = vera.merged_weight()
        dvora.magnitude.copy_(direction.norm(dim=1))  # the magnitude of VeRA's own weight
        torch.testing.assert_close(dvora.merged_weight(), direction, rtol=1e-10, atol=1e-12)
        dvora.magnitude.mul_(2.0)
        torch.testing.assert_close(dvora.merged_weight(), 2.0 * direction, rtol=1e-10, atol=1e-12)


def test_projections_are_shared_per_shape_and_not_trained():
    model = make_model()
    add_adapters(model, "dvora", rank=2, seed=4)
    q, v, up = model.block["q_proj"], model.block["v_proj"], model.block["up"]
    assert isinstance(q, DVoRALinear) and q.projections is v.projections and up.projections is not q.projections
    torch.testing.assert_close(q.projections.A, VeRAProjections(8, 8, 2, seed=4).A)
    assert not any(p.requires_grad for p in q.projections.parameters())
    assert model(tokens()).shape == (3, 5, 11)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"VeRA projections have A \(2, 8\).*expected A \(2, 4\)"):
        DVoRALinear(nn.Linear(4, 4), rank=2, projections=VeRAProjections(8, 4, 2))
    with pytest.raises(ValueError, match=r"rank must be between 1 and min\(in_features, out_features\) = 4"):
        DVoRALinear(nn.Linear(4, 6), rank=5)
    with pytest.raises(ValueError, match="alpha must be positive"):
        add_adapters(make_model(), "dvora", rank=2, alpha=-2.0)
