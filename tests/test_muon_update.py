"""update_rule='muon' (galore_plus/rules/muon.py): Newton-Schulz against torch's, the full-rank case against
torch.optim.Muon, the low-rank case against a dense float64 re-implementation, and what the rule refuses."""

import math

import pytest
import torch

from galore_plus import GaLorePlusAdamW
from galore_plus.rules.muon import NEWTON_SCHULZ_COEFFICIENTS, newton_schulz, rms_matching_ratio

torch_muon = pytest.importorskip("torch.optim._muon")


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (12, 12)])
def test_newton_schulz_matches_torch_and_lands_near_orthogonal(shape):
    matrix = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz(matrix)
    theirs = torch_muon._zeropower_via_newtonschulz(matrix, NEWTON_SCHULZ_COEFFICIENTS, 5, 1e-7).float()
    # torch iterates in bfloat16 (unit roundoff 2^-8), ours in float32: entries of an orthogonal factor are about
    # 1/sqrt(min side); five iterations of three products each may lose a few bfloat16 ulps of that
    scale = 1 / math.sqrt(min(shape))
    assert (ours - theirs).abs().max() < 16 * 2**-8 * scale
    singular = torch.linalg.svdvals(ours)
    assert singular.min() > 0.6 and singular.max() < 1.25  # Muon's quintic: about [0.7, 1.2], not exactly 1


def _run(model_steps, make_optimizer, grads):
    weight = torch.nn.Parameter(torch.randn(12, 8, generator=torch.Generator().manual_seed(1)))
    optimizer = make_optimizer(weight)
    for grad in grads[:model_steps]:
        weight.grad = grad.clone()
        optimizer.step()
    return weight.detach()


def test_a_full_rank_basis_is_torch_muon(monkeypatch):
    """With r = min(m, n) and no refresh after the first step, P N + (G - P R) is Muon's Nesterov momentum of G;
    torch's Newton-Schulz (bfloat16) is swapped for ours so that only float32 rounding separates the two."""
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", lambda g, coefficients, steps, eps: newton_schulz(g))
    grads = [torch.randn(12, 8, generator=torch.Generator().manual_seed(10 + t)) for t in range(6)]
    ours = _run(6, lambda w: GaLorePlusAdamW([{"params": [w], "rank": 8, "projector": "svd", "update_rule": "muon",
                                               "scale": 1.0, "update_proj_gap": 100}],
                                             lr=1e-2, betas=(0.95, 0.999), weight_decay=0.1), grads)
    theirs = _run(6, lambda w: torch.optim.Muon([w], lr=1e-2, momentum=0.95, weight_decay=0.1,
                                                adjust_lr_fn="match_rms_adamw"), grads)
    start = _run(0, lambda w: torch.optim.SGD([w]), grads)
    moved = (theirs - start).abs().max()
    assert moved > 1e-2
    assert (ours - theirs).abs().max() < 1e-5 * max(1.0, moved)


def dense_reference(start, grads, basis_at, lr, beta, scale, decay):
    """The rule in float64: momentum of R = G Q^T (right side, Q from ``basis_at(step)``), D = G + (N - R) Q,
    five Newton-Schulz iterations, p <- p (1 - lr wd) - lr scale 0.2 sqrt(max(m, n)) O."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    weight, momentum = start.double(), None
    for step, grad in enumerate(grads, start=1):
        grad, basis = grad.double(), basis_at(step).double()
        low_rank = grad @ basis.t()
        momentum = (1 - beta) * low_rank if momentum is None else beta * momentum + (1 - beta) * low_rank
        nesterov = (1 - beta) * low_rank + beta * momentum
        x = (grad + (nesterov - low_rank) @ basis).t()   # the wide side last
        x = x / x.norm()
        for _ in range(5):
            gram = x @ x.t()
            x = a * x + (b * gram + c * gram @ gram) @ x
        weight = weight * (1 - lr * decay) - lr * scale * 0.2 * math.sqrt(max(grad.shape)) * x.t()
    return weight


def test_the_low_rank_rule_equals_a_dense_float64_reimplementation_over_refreshes():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(12, 8))
    start = weight.detach().clone()
    optimizer = GaLorePlusAdamW([{"params": [weight], "rank": 3, "projector": "svd", "update_rule": "muon",
                                  "scale": 0.5, "update_proj_gap": 3}], lr=2e-2, betas=(0.9, 0.999), weight_decay=0.05)
    grads, bases = [], {}
    for step in range(1, 8):
        grad = torch.randn(12, 8)
        weight.grad = grad.clone()
        optimizer.step()
        grads.append(grad)
        bases[step] = optimizer.state[weight]["projector"].clone()
    assert not torch.equal(bases[1], bases[4])  # the basis was refreshed, the momentum kept as it is
    reference = dense_reference(start, grads, bases.__getitem__, 2e-2, 0.9, 0.5, 0.05)
    moved = (reference - start.double()).abs().max().item()
    assert moved > 1e-2
    assert (weight.detach().double() - reference).abs().max().item() < 1e-5 * max(1.0, moved)


def test_rms_matching_ratio_is_torch_muons_match_rms_adamw():
    assert rms_matching_ratio((4096, 11008)) == torch_muon._adjust_lr(1.0, "match_rms_adamw", (4096, 11008))


@pytest.mark.parametrize("extra, key", [({"scale": "auto"}, "scale"), ({"scale": -1.0}, "scale"),
                                        ({"full_rank_residual": True}, "full_rank_residual"),
                                        ({"residual_ratio": 0.01}, "residual_ratio")])
def test_what_the_rule_does_not_do_is_refused_naming_the_key(extra, key):
    weight = torch.nn.Parameter(torch.randn(12, 8))
    with pytest.raises(ValueError, match=f"key '{key}'"):
        GaLorePlusAdamW([{"params": [weight], "rank": 3, "update_rule": "muon", **extra}])
