"""AdaLoRA: the SVD-form layer and its regulariser against dense references, the budget schedule and importance
allocation against a hand-written re-implementation of the lecture's formulas, and parity with peft's AdaLoRA
(outputs, gradients, singular values and kept ranks over a scheduled run)."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from support import linear64, make_model, randomize_adapters, tokens
from galore_plus.adapters import (
    AdaLoRALinear,
    AdaLoRASchedule,
    adapter_loss,
    adapter_parameters,
    adapter_step,
    adapter_training_state,
    add_adapters,
)

SCHEDULE = {"target_rank": 2, "total_steps": 10, "warmup_steps": 2, "final_steps": 2, "interval": 1}


def test_forward_and_merge_match_the_dense_formula():
    layer = AdaLoRALinear(linear64(6, 5), rank=3, schedule=AdaLoRASchedule(1, 10), alpha=4.5)
    randomize_adapters(layer, seed=4)
    x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    P, lam, Q = layer.left, layer.singular_values, layer.right
    with torch.no_grad():
        W = layer.base.weight + 1.5 * P @ torch.diag(lam) @ Q
        expected = x @ W.T + layer.base.bias
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.merge()(x), expected, rtol=1e-10, atol=1e-12)


def test_fresh_layer_is_the_base_layer_with_peft_initialisation():
    base = linear64(64, 48)
    layer = AdaLoRALinear(base, rank=8, schedule=AdaLoRASchedule(2, 10), generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 64, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(layer.singular_values) == 0 and layer.rank_mask.all()
    for factor in (layer.left, layer.right):
        assert abs(factor.std().item() - 0.02) < 0.003 and abs(factor.mean().item()) < 0.002


def test_orthogonality_loss_is_the_weighted_mean_of_the_frobenius_residuals():
    model = make_model()
    add_adapters(model, "adalora", rank=3, target_modules=["q_proj", "up"], target_rank=1, total_steps=5,
                 orth_reg_weight=0.7)
    randomize_adapters(model)
    residuals = []
    for layer in (model.block["q_proj"], model.block["up"]):
        P, Q = layer.left.detach(), layer.right.detach()
        residuals += [(P.T @ P - torch.eye(3)).norm(), (Q @ Q.T - torch.eye(3)).norm()]
    expected = 0.7 * sum(residuals) / 4
    loss = adapter_loss(model)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.block["q_proj"].left.grad.abs().max() > 0 and model.block["up"].right.grad.abs().max() > 0
    assert adapter_loss(make_model()) == 0.0


def test_budget_schedule_is_cubic_between_warmup_and_final_phase():
    schedule = AdaLoRASchedule(target_rank=1, total_steps=10, warmup_steps=2, final_steps=2, interval=2)
    initial, target = 12, 4
    expected = {1: (12, False), 2: (12, False), 3: (int(8 * (5 / 6) ** 3 + 4), False), 4: (int(8 * (4 / 6) ** 3 + 4), True),
                7: (int(8 * (1 / 6) ** 3 + 4), False), 8: (4, True), 9: (4, True), 10: (4, True)}
    for step, value in expected.items():
        assert schedule.budget(step, initial, target) == value, step
    assert [schedule.budget(s, initial, target)[0] for s in range(1, 11)] == [12, 12, 8, 6, 5, 4, 4, 4, 4, 4]


def reference_scores(history, beta1=0.85, beta2=0.85):
    """Score per component from a list of per-step {name: (value, grad)}, by the lecture's formulas (7)-(10)."""
    average = uncertainty = None
    for factors in history:
        sensitivity = {name: (value * grad).abs() for name, (value, grad) in factors.items()}
        if average is None:
            average = {n: torch.zeros_like(s) for n, s in sensitivity.items()}
            uncertainty = {n: torch.zeros_like(s) for n, s in sensitivity.items()}
        for n, s in sensitivity.items():
            average[n] = beta1 * average[n] + (1 - beta1) * s
            uncertainty[n] = beta2 * uncertainty[n] + (1 - beta2) * (s - average[n]).abs()
    score = {n: average[n] * uncertainty[n] for n in average}
    return score["singular_values"] + score["left"].mean(dim=0) + score["right"].mean(dim=1)


def test_allocation_keeps_the_most_important_components_over_all_layers():
    model = make_model()
    add_adapters(model, "adalora", rank=4, target_modules=["q_proj", "v_proj", "up"], **SCHEDULE)
    randomize_adapters(model)
    layers = [model.block[name] for name in ("q_proj", "v_proj", "up")]
    optimizer = torch.optim.SGD(adapter_parameters(model), lr=1e-2)
    history = {id(layer): [] for layer in layers}
    for step in range(1, 5):
        loss = model(tokens(step)).square().mean() + adapter_loss(model)
        loss.backward()
        optimizer.step()
        for layer in layers:
            history[id(layer)].append({name: (p.detach().clone(), p.grad.clone()) for name, p in layer.factors().items()})
        adapter_step(model, step)
        optimizer.zero_grad()
        for layer in layers:
            torch.testing.assert_close(layer.component_scores(), reference_scores(history[id(layer)]))
        budget, due = AdaLoRASchedule(**SCHEDULE).budget(step, 12, 6)
        if not due:
            assert all(layer.rank_mask.all() for layer in layers)
            continue
        scores = torch.cat([reference_scores(history[id(layer)]) for layer in layers])
        kept = torch.cat([layer.rank_mask for layer in layers])
        assert int(kept.sum()) == budget < 12
        assert set(torch.nonzero(kept).flatten().tolist()) == set(scores.topk(budget).indices.tolist())
        dropped = torch.cat([layer.singular_values.detach() for layer in layers])[~kept]
        assert torch.count_nonzero(dropped) == 0


def test_final_phase_fixes_the_kept_components_and_zeros_the_rest_each_step():
    model = make_model()
    add_adapters(model, "adalora", rank=4, target_modules=["q_proj", "v_proj"], **SCHEDULE)
    randomize_adapters(model)
    layers = [model.block["q_proj"], model.block["v_proj"]]
    optimizer = torch.optim.Adam(adapter_parameters(model), lr=1e-2)
    for step in range(1, 11):
        (model(tokens(step)).square().mean() + adapter_loss(model)).backward()
        optimizer.step()
        adapter_step(model, step)
        optimizer.zero_grad()
        state = adapter_training_state(model)
        if step < 8:  # Ī and Ū of every adapter parameter
            assert sum(t.numel() for t in state) == 2 * sum(p.numel() for p in adapter_parameters(model))
        else:
            assert state == []
        if step == 8:
            fixed = [layer.rank_mask.clone() for layer in layers]
            assert sum(int(m.sum()) for m in fixed) == 4
            assert all(not layer.sensitivity for layer in layers)
        if step >= 8:
            for layer, mask in zip(layers, fixed):
                assert torch.equal(layer.rank_mask, mask)
                assert torch.count_nonzero(layer.singular_values[~mask]) == 0
                assert torch.count_nonzero(layer.singular_values[mask]) == int(mask.sum())


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"target_rank": 4}, ValueError, "target_rank must be less than rank = 4, got 4"),
    ({"target_rank": 0}, ValueError, "target_rank must be >= 1, got 0"),
    ({"total_steps": 2.5}, TypeError, "total_steps must be an int, got float"),
    ({"warmup_steps": 8}, ValueError, r"warmup_steps \(8\) must be less than total_steps - final_steps \(10 - 2\)"),
    ({"final_steps": -1}, ValueError, "final_steps must be >= 0, got -1"),
    ({"interval": 0}, ValueError, "interval must be >= 1, got 0"),
    ({"beta1": 1.0}, ValueError, r"beta1 must be in \(0, 1\), got 1.0"),
    ({"beta2": 0.0}, ValueError, r"beta2 must be in \(0, 1\), got 0.0"),
    ({"orth_reg_weight": -0.1}, ValueError, "orth_reg_weight must be >= 0, got -0.1"),
])
def test_bad_schedule_arguments_are_refused_before_any_change(options, error, message):
    model = make_model()
    with pytest.raises(error, match=message):
        add_adapters(model, "adalora", rank=4, **(SCHEDULE | options))
    assert all(p.requires_grad for p in model.parameters())


def test_allocating_without_gradients_says_when_to_call_it():
    model = make_model()
    add_adapters(model, "adalora", rank=4, **SCHEDULE)
    with pytest.raises(RuntimeError, match=r"no gradient: call adapter_step\(model, step\) after backward\(\)"):
        adapter_step(model, 1)


# Parity with peft's AdaLoRA on the same tensors, inputs and schedule.


class LossModel(nn.Module):
    """Three linear layers; ``forward`` returns an object with ``loss``, as peft's AdaLoRA expects."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 5, bias=False)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> SimpleNamespace:
        out = self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return SimpleNamespace(loss=(out - target).square().mean())


PEFT_NAMES = {"left": "lora_B", "right": "lora_A", "singular_values": "lora_E"}
LAYERS = ("fc1", "fc2", "fc3")


def peft_tensor(model, layer: str, name: str) -> torch.Tensor:
    return getattr(getattr(model.base_model.model, layer), PEFT_NAMES[name])["default"]


def test_peft_parity_of_outputs_gradients_and_kept_ranks():
    peft = pytest.importorskip("peft")
    rank, alpha = 4, 6.0
    torch.manual_seed(0)
    plain = LossModel()
    ours = copy.deepcopy(plain)
    # peft divides by (rank + 1e-5); the same factor here makes the two scalings equal to the last bit
    add_adapters(ours, "adalora", rank=rank, alpha=alpha * rank / (rank + 1e-5), target_modules=list(LAYERS),
                 target_rank=2, total_steps=10, warmup_steps=2, final_steps=2, interval=1, orth_reg_weight=0.3)
    randomize_adapters(ours)
    config = peft.AdaLoraConfig(init_r=rank, target_r=2, lora_alpha=alpha, target_modules=list(LAYERS), tinit=2,
                                tfinal=2, total_step=10, deltaT=1, orth_reg_weight=0.3, lora_dropout=0.0)
    theirs = peft.get_peft_model(copy.deepcopy(plain), config)
    with torch.no_grad():
        for layer in LAYERS:
            for name, p in getattr(ours, layer).factors().items():
                peft_tensor(theirs, layer, name).copy_(p.view_as(peft_tensor(theirs, layer, name)))

    ours_optimizer = torch.optim.Adam(adapter_parameters(ours), lr=2e-2)
    theirs_optimizer = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    generator = torch.Generator().manual_seed(1)
    kept_counts = []
    for step in range(1, 11):
        x, target = torch.randn(16, 6, generator=generator), torch.randn(16, 5, generator=generator)
        ours_loss = ours(x, target).loss + adapter_loss(ours)
        theirs_loss = theirs.base_model(x, target).loss  # AdaLoraModel.forward adds its regulariser
        torch.testing.assert_close(ours_loss, theirs_loss, rtol=1e-5, atol=1e-6)
        ours_loss.backward()
        theirs_loss.backward()
        for layer in LAYERS:
            for name, p in getattr(ours, layer).factors().items():
                their_grad = peft_tensor(theirs, layer, name).grad
                assert p.grad.abs().max() > 0
                torch.testing.assert_close(p.grad, their_grad.view_as(p.grad), rtol=1e-4, atol=1e-6)
        ours_optimizer.step()
        theirs_optimizer.step()
        adapter_step(ours, step)
        theirs.base_model.update_and_allocate(step)
        ours_optimizer.zero_grad()
        theirs_optimizer.zero_grad()
        pattern = theirs.peft_config["default"].rank_pattern
        allocator = theirs.base_model.rankallocator
        for layer in LAYERS:
            if step < 8:  # before the final phase: the smoothed sensitivity and uncertainty agree
                for name, (average, uncertainty) in getattr(ours, layer).sensitivity.items():
                    key = f"{layer}.{PEFT_NAMES[name]}.default"
                    torch.testing.assert_close(average, allocator.exp_avg_ipt[key].view_as(average), rtol=1e-4, atol=1e-9)
                    torch.testing.assert_close(uncertainty, allocator.exp_avg_unc[key].view_as(average), rtol=1e-4, atol=1e-9)
            values = getattr(ours, layer).singular_values.detach()
            torch.testing.assert_close(values, peft_tensor(theirs, layer, "singular_values").detach().view(-1),
                                       rtol=1e-4, atol=1e-6)
            if step > 2:  # peft records a rank pattern from the first pruning step on
                key = f"{layer}.lora_E.default"
                assert getattr(ours, layer).rank_mask.tolist() == pattern[key], (step, layer)
        kept_counts.append(sum(int(getattr(ours, layer).rank_mask.sum()) for layer in LAYERS))
    assert kept_counts[:2] == [12, 12] and kept_counts[-1] == 6  # pruned from the initial to the target budget
    assert kept_counts[2] < 12
