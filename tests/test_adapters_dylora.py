"""DyLoRA against a hand-written dense float64 reference: the rank sampled per training forward, the truncated
update and its gradients (both variants), evaluation and merging at a chosen rank, seeding, bad arguments."""

import pytest
import torch
from torch import nn

from support import linear64, make_model, randomize_adapters, tokens
from galore_plus.adapters import DyLoRALinear, DyLoRARankSampler, add_adapters, merge_adapters, set_adapter_rank

RANK, ALPHA = 4, 6.0


def dense_dylora(layer: DyLoRALinear, b: int, x: torch.Tensor, A=None, B=None) -> torch.Tensor:
    """``W x + bias + (alpha / b) * B[:, :b] A[:b] x`` from dense matrices."""
    A = layer.lora_A if A is None else A
    B = layer.lora_B if B is None else B
    update = (ALPHA / b) * B[:, :b] @ A[:b]
    return x @ (layer.base.weight + update).T + layer.base.bias


def make_layer(seed: int = 0, min_rank: int = 1, frozen: bool = False) -> DyLoRALinear:
    layer = DyLoRALinear(linear64(7, 6), rank=RANK, alpha=ALPHA, min_rank=min_rank, frozen=frozen,
                         sampler=DyLoRARankSampler(seed))
    randomize_adapters(layer, seed=4)
    return layer


def rank_used(layer: DyLoRALinear, x: torch.Tensor, out: torch.Tensor) -> int:
    """The one rank whose dense reference gives ``out``."""
    with torch.no_grad():
        matches = [b for b in range(1, RANK + 1) if torch.allclose(out, dense_dylora(layer, b, x), rtol=1e-10, atol=1e-12)]
    assert len(matches) == 1, matches
    return matches[0]


X = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_each_training_forward_uses_one_sampled_rank_covering_the_range():
    layer = make_layer(min_rank=2)
    state = torch.random.get_rng_state()
    with torch.no_grad():
        used = [rank_used(layer, X, layer(X)) for _ in range(60)]
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is not used
    assert set(used) == {2, 3, 4}
    again = make_layer(min_rank=2)
    with torch.no_grad():
        assert [rank_used(again, X, again(X)) for _ in range(60)] == used  # same seed, same ranks
    other = make_layer(seed=1, min_rank=2)
    with torch.no_grad():
        assert [rank_used(other, X, other(X)) for _ in range(60)] != used


@pytest.mark.parametrize("frozen", [False, True])
def test_gradients_reach_only_the_sampled_components(frozen):
    layer = make_layer(frozen=frozen)
    seen = set()
    for _ in range(40):
        layer.zero_grad()
        A = layer.lora_A.detach().clone().requires_grad_(True)
        B = layer.lora_B.detach().clone().requires_grad_(True)
        out = layer(X)
        b = rank_used(layer, X, out.detach())
        seen.add(b)
        upstream = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(b))
        (out * upstream).sum().backward()
        (dense_dylora(layer, b, X, A, B) * upstream).sum().backward()
        trained = slice(b - 1, b) if frozen else slice(0, b)
        expected_A, expected_B = torch.zeros_like(A), torch.zeros_like(B)
        expected_A[trained] = A.grad[trained]
        expected_B[:, trained] = B.grad[:, trained]
        assert expected_A.abs().max() > 1e-3 and expected_B.abs().max() > 1e-3
        torch.testing.assert_close(layer.lora_A.grad, expected_A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.lora_B.grad, expected_B, rtol=1e-10, atol=1e-12)
    assert seen == {1, 2, 3, 4}


def test_eval_and_merge_use_the_rank_set_on_the_model():
    model = nn.Sequential(make_layer())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X), dense_dylora(model[0], RANK, X), rtol=1e-10, atol=1e-12)
        outputs = {}
        for b in range(1, RANK + 1):
            set_adapter_rank(model, b)
            outputs[b] = model(X)
            torch.testing.assert_close(outputs[b], dense_dylora(model[0], b, X), rtol=1e-10, atol=1e-12)
        assert (outputs[1] - outputs[RANK]).abs().max() > 1e-2
    set_adapter_rank(model, 2)
    expected = model(X)
    merge_adapters(model)
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model(X), expected, rtol=1e-10, atol=1e-12)


def test_fresh_layers_leave_the_model_unchanged_at_every_rank():
    model = make_model()
    expected = model(tokens())
    add_adapters(model, "dylora", rank=4, alpha=8.0, seed=3)
    for _ in range(5):
        torch.testing.assert_close(model(tokens()), expected)  # training mode: sampled ranks
    model.eval()
    for b in range(1, 5):
        set_adapter_rank(model, b)
        torch.testing.assert_close(model(tokens()), expected)


def test_add_adapters_shares_one_seeded_sampler():
    model = make_model()
    add_adapters(model, "dylora", rank=3, seed=5, min_rank=2, frozen=True)
    layers = [m for m in model.modules() if isinstance(m, DyLoRALinear)]
    assert len(layers) == 4 and all(layer.sampler is layers[0].sampler for layer in layers)
    assert all(layer.min_rank == 2 and layer.frozen for layer in layers)
    expected = torch.randint(2, 4, (1,), generator=torch.Generator().manual_seed(5))
    assert layers[0].sampler.sample(2, 3) == int(expected)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="min_rank must be an int between 1 and rank = 4, got 5"):
        add_adapters(make_model(), "dylora", rank=4, min_rank=5)
    with pytest.raises(ValueError, match="min_rank must be an int between 1 and rank = 4, got 0"):
        DyLoRALinear(nn.Linear(6, 6), rank=4, min_rank=0)
    with pytest.raises(TypeError, match="frozen must be a bool"):
        DyLoRALinear(nn.Linear(6, 6), rank=4, frozen="yes")
    model = make_model()
    add_adapters(model, "dylora", rank=4, min_rank=2)
    with pytest.raises(ValueError, match="layer 'block.q_proj': rank must be between min_rank = 2 and rank = 4, got 5"):
        set_adapter_rank(model, 5)
    with pytest.raises(ValueError, match="rank must be between min_rank = 2 and rank = 4, got 1"):
        set_adapter_rank(model, 1)
    with pytest.raises(TypeError, match="rank must be an int"):
        set_adapter_rank(model, 2.0)
    assert all(m.active_rank == 4 for m in model.modules() if isinstance(m, DyLoRALinear))
    with pytest.raises(ValueError, match="no DyLoRA adapters"):
        set_adapter_rank(make_model(), 2)
