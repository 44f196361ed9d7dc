"""Tests for galore_plus.adapters: what every method shares (targets, merging, save/load, parameter counts, bad
input), and LoRA/DoRA/VeRA's formulas and parity with peft. Each newer method has its own test file."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from support import (ADAPTER_METHODS, ADAPTER_OPTIONS, ADAPTER_PARAMETER_COUNTS, make_model, randomize_adapters,
                     tokens)
from galore_plus.adapters import (
    ADAPTERS,
    AdapterLinear,
    DoRALinear,
    LoRALinear,
    VeRALinear,
    VeRAProjections,
    adapter_loss,
    adapter_parameters,
    adapter_step,
    add_adapters,
    merge_adapters,
)

ATOL = 1e-5


def test_all_linear_adapts_every_linear_but_lm_head_and_freezes_the_rest():
    for method in ADAPTER_METHODS:
        model = make_model()
        names = add_adapters(model, method, rank=2, **ADAPTER_OPTIONS.get(method, {}))
        assert names == ["block.q_proj", "block.v_proj", "block.up", "down"]
        assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, AdapterLinear)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in adapter_parameters(model)}
        assert len(trainable) > 0


@pytest.mark.parametrize(
    ("target_modules", "expected"),
    [
        (["q_proj", "down"], ["block.q_proj", "down"]),
        (["block.up"], ["block.up"]),
        (r"block\.(q|v)_proj", ["block.q_proj", "block.v_proj"]),
        (r".*head", ["lm_head"]),
    ],
)
def test_target_modules_by_suffix_list_and_regex(target_modules, expected):
    model = make_model()
    assert add_adapters(model, "lora", rank=2, target_modules=target_modules) == expected
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear)) == sorted(expected)


def test_suffix_matches_whole_name_components_only():
    model = make_model()
    with pytest.raises(ValueError, match="'proj' matches no nn.Linear"):
        add_adapters(model, "lora", rank=2, target_modules=["proj"])


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_fresh_adapters_leave_outputs_unchanged(method):
    model = make_model()
    expected = model(tokens())
    add_adapters(model, method, rank=3, alpha=6.0, **ADAPTER_OPTIONS.get(method, {}))
    torch.testing.assert_close(model(tokens()), expected, atol=ATOL, rtol=0)
    randomize_adapters(model)
    assert (model(tokens()) - expected).abs().max() > 1e-2  # the adapters are in the forward


def test_registry_lists_every_method_and_the_error_names_them():
    assert list(ADAPTERS) == ADAPTER_METHODS
    with pytest.raises(ValueError, match="unknown adapter method 'qlora'; expected one of " + ", ".join(ADAPTER_METHODS)):
        add_adapters(make_model(), "qlora", rank=2)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    method=st.sampled_from(ADAPTER_METHODS),
    in_features=st.integers(2, 12),
    out_features=st.integers(2, 12),
    rank_fraction=st.floats(0.0, 1.0),
)
def test_parameter_counts_match_the_documented_formulas(method, in_features, out_features, rank_fraction):
    rank = 2 + int(rank_fraction * (min(in_features, out_features) - 2))
    model = nn.Sequential(nn.Linear(in_features, out_features))
    add_adapters(model, method, rank=rank, **ADAPTER_OPTIONS.get(method, {}))
    count = sum(p.numel() for p in adapter_parameters(model))
    assert count == ADAPTER_PARAMETER_COUNTS[method](rank, in_features, out_features)
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_layer_formulas():
    torch.manual_seed(3)
    base = nn.Linear(5, 4)
    x = torch.randn(7, 5)
    W, b = base.weight.detach(), base.bias.detach()

    lora = LoRALinear(copy.deepcopy(base), rank=2, alpha=6.0)
    dora = DoRALinear(copy.deepcopy(base), rank=2, alpha=6.0)
    vera = VeRALinear(copy.deepcopy(base), rank=2, alpha=6.0, seed=5)
    for layer in (lora, dora, vera):
        randomize_adapters(layer)
    with torch.no_grad():
        delta = 3.0 * lora.lora_B @ lora.lora_A
        torch.testing.assert_close(lora(x), x @ (W + delta).T + b)

        V = W + 3.0 * dora.lora_B @ dora.lora_A
        W_dora = dora.magnitude[:, None] * V / V.norm(dim=1, keepdim=True)
        torch.testing.assert_close(dora(x), x @ W_dora.T + b)

        A, B = vera.projections.A, vera.projections.B
        delta = 3.0 * torch.diag(vera.lambda_b) @ B @ torch.diag(vera.lambda_d) @ A
        torch.testing.assert_close(vera(x), x @ (W + delta).T + b)


def test_initialisation_follows_peft_conventions():
    torch.manual_seed(0)
    base = nn.Linear(16, 6)
    lora = LoRALinear(copy.deepcopy(base), rank=4, alpha=8.0)
    assert lora.scaling == 2.0
    assert LoRALinear(copy.deepcopy(base), rank=4).scaling == 1.0
    assert torch.count_nonzero(lora.lora_B) == 0
    bound = 1.0 / 16**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in=16
    assert lora.lora_A.abs().max() <= bound and lora.lora_A.abs().max() > 0.5 * bound

    dora = DoRALinear(copy.deepcopy(base), rank=4)
    torch.testing.assert_close(dora.magnitude.detach(), base.weight.detach().norm(dim=1))
    assert dora.magnitude.shape == (6,)

    vera = VeRALinear(copy.deepcopy(base), rank=4)
    assert torch.all(vera.lambda_d == 0.1) and torch.all(vera.lambda_b == 0)
    assert [n for n, _ in vera.named_parameters() if not n.startswith("base.")] == ["lambda_d", "lambda_b"]


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_bfloat16_models_keep_their_dtype_and_follow_float32(method):
    model = make_model()
    plain = model(tokens())
    add_adapters(model, method, rank=2, **ADAPTER_OPTIONS.get(method, {}))
    randomize_adapters(model)
    model.eval()  # DyLoRA: the full rank, not a sampled one
    expected = model(tokens())
    low = copy.deepcopy(model).to(torch.bfloat16)
    out = low(tokens())
    assert out.dtype == torch.bfloat16
    assert {p.dtype for p in adapter_parameters(low)} == {torch.bfloat16}
    tolerance = 0.05  # a few bfloat16 roundings (2^-8 relative) through four layers of outputs of size ~1
    assert (out.float() - expected).abs().max() < tolerance
    assert (expected - plain).abs().max() > 5 * tolerance  # the adapters' effect is far above the tolerance


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_merge_gives_plain_linears_with_equal_outputs(method):
    model = make_model()
    add_adapters(model, method, rank=2, alpha=4.0, target_modules="all-linear", **ADAPTER_OPTIONS.get(method, {}))
    randomize_adapters(model)
    model.eval()
    expected = model(tokens())
    assert merge_adapters(model) is model
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n in ("block.q_proj", "down"))
    assert model.block["v_proj"].bias is None
    torch.testing.assert_close(model(tokens()), expected, atol=ATOL, rtol=1e-5)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    method=st.sampled_from(ADAPTER_METHODS),
    in_features=st.integers(1, 12),
    out_features=st.integers(1, 12),
    rank_fraction=st.floats(0.0, 1.0),
    alpha=st.floats(0.5, 32.0),
    bias=st.booleans(),
)
def test_merge_equals_forward_for_any_shape(method, in_features, out_features, rank_fraction, alpha, bias):
    torch.manual_seed(0)
    rank = 1 + int(rank_fraction * (min(in_features, out_features) - 1))
    if method == "adalora":
        rank = max(rank, 2)  # its target rank (1) must be below the rank
        if min(in_features, out_features) < 2:
            return
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=bias))
    add_adapters(model, method, rank=rank, alpha=alpha, **ADAPTER_OPTIONS.get(method, {}))
    randomize_adapters(model)
    model.eval()
    x = torch.randn(4, in_features)
    expected = model(x)
    merge_adapters(model)
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(in_features=st.integers(2, 12), out_features=st.integers(2, 12), rank_fraction=st.floats(0.0, 1.0))
def test_update_rank_is_bounded_and_dora_rows_have_the_magnitude(in_features, out_features, rank_fraction):
    torch.manual_seed(0)
    rank = 1 + int(rank_fraction * (min(in_features, out_features) - 2))
    base = nn.Linear(in_features, out_features).double()
    lora = LoRALinear(copy.deepcopy(base), rank=rank)
    dora = DoRALinear(copy.deepcopy(base), rank=rank)
    vera = VeRALinear(copy.deepcopy(base), rank=rank)
    for layer in (lora, dora, vera):
        randomize_adapters(layer)
    with torch.no_grad():
        for layer in (lora, vera):
            update = layer.merged_weight() - base.weight
            assert torch.linalg.matrix_rank(update) <= rank
        row_norms = dora.merged_weight().norm(dim=1)
        torch.testing.assert_close(row_norms, dora.magnitude.abs())


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_state_dict_round_trip_into_a_freshly_adapted_model(method):
    model = make_model()
    add_adapters(model, method, rank=2, dropout=0.1, seed=7, **ADAPTER_OPTIONS.get(method, {}))
    randomize_adapters(model)
    model.eval()
    state = model.state_dict()
    assert not any("projections" in key for key in state)

    fresh = make_model(seed=123)
    add_adapters(fresh, method, rank=2, dropout=0.1, seed=7, **ADAPTER_OPTIONS.get(method, {}))
    fresh.load_state_dict(state)
    fresh.eval()
    torch.testing.assert_close(fresh(tokens()), model(tokens()), atol=0, rtol=0)


def test_vera_projections_are_shared_per_shape_and_rebuilt_from_the_seed():
    model = make_model()
    add_adapters(model, "vera", rank=2, seed=4)
    q, v, up = model.block["q_proj"], model.block["v_proj"], model.block["up"]
    assert q.projections is v.projections
    assert up.projections is not q.projections
    model.double()
    assert q.projections is v.projections and q.projections.A.dtype == torch.float64

    same = VeRAProjections(8, 8, 2, seed=4)
    other = VeRAProjections(8, 8, 2, seed=5)
    torch.testing.assert_close(same.A, q.projections.A.float())
    torch.testing.assert_close(same.B, q.projections.B.float())
    assert not torch.equal(same.A, other.A)
    assert list(same.state_dict()) == []


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_same_seed_gives_same_initialisation_without_the_global_rng(method):
    first, second, third = make_model(), make_model(), make_model()
    state = torch.random.get_rng_state()
    add_adapters(first, method, rank=2, seed=9, **ADAPTER_OPTIONS.get(method, {}))
    assert torch.equal(torch.random.get_rng_state(), state)
    add_adapters(second, method, rank=2, seed=9, **ADAPTER_OPTIONS.get(method, {}))
    add_adapters(third, method, rank=2, seed=10, **ADAPTER_OPTIONS.get(method, {}))
    for p, q in zip(adapter_parameters(first), adapter_parameters(second)):
        assert torch.equal(p, q)
    if method not in ("vera", "dvora"):  # VeRA's random matrices are buffers, not parameters
        assert any(not torch.equal(p, q) for p, q in zip(adapter_parameters(first), adapter_parameters(third)))


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_training_the_adapters_with_a_plain_loop_lowers_the_loss(method):
    model = make_model()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    options = {"adalora": {"target_rank": 2, "total_steps": 30, "warmup_steps": 5, "final_steps": 5}}
    add_adapters(model, method, rank=4, alpha=8.0, **options.get(method, {}))
    optimizer = torch.optim.AdamW(adapter_parameters(model), lr=3e-2, weight_decay=0.0)
    x, target = tokens(1), tokens(2)

    def heldout() -> float:
        model.eval()
        with torch.no_grad():
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), target.flatten()).item()
        model.train()
        return loss

    before = heldout()
    for step in range(1, 31):
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), target.flatten())
        (loss + adapter_loss(model)).backward()
        optimizer.step()
        adapter_step(model, step)
        optimizer.zero_grad()
    assert heldout() < 0.85 * before
    merge_adapters(model)
    assert torch.equal(model.embed.weight, frozen["embed.weight"])
    assert torch.equal(model.lm_head.weight, frozen["lm_head.weight"])
    assert not torch.equal(model.down.weight, frozen["down.weight"])


def test_multihead_attention_out_proj_is_left_alone():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    names = add_adapters(layer, "lora", rank=2)
    assert names == ["linear1", "linear2"]
    assert layer(torch.randn(2, 3, 8)).shape == (2, 3, 8)


def test_options_a_method_does_not_take_are_refused_before_any_change():
    model = make_model()
    with pytest.raises(TypeError, match="option\\(s\\) 'min_rank' that method 'lora' does not take; its options are: \\(none\\)"):
        add_adapters(model, "lora", rank=2, min_rank=1)
    with pytest.raises(TypeError, match="'warmup' that method 'adalora' does not take; its options are: target_rank, total_steps"):
        add_adapters(model, "adalora", rank=2, target_rank=1, total_steps=5, warmup=1)
    with pytest.raises(TypeError, match="layer 'block.q_proj'.*missing 1 required keyword-only argument: 'total_steps'"):
        add_adapters(model, "adalora", rank=2, target_rank=1)
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_below_one(rank):
    with pytest.raises(ValueError, match="rank must be between 1 and"):
        add_adapters(make_model(), "lora", rank=rank)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 9}, r"layer 'block.q_proj'.*min\(in_features, out_features\) = 8.*got 9"),
        ({"rank": 2, "alpha": -1.0}, "alpha must be positive, got -1"),
    ],
)
def test_bad_rank_or_alpha_leaves_the_model_untouched(kwargs, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        add_adapters(model, "dora", **kwargs)
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_rank_must_be_an_int():
    with pytest.raises(TypeError, match="rank must be an int, got float"):
        add_adapters(make_model(), "lora", rank=2.0)
    with pytest.raises(TypeError, match="rank must be an int"):
        LoRALinear(nn.Linear(4, 4), rank=True)


@pytest.mark.parametrize("target_modules", [["qproj"], ["q_proj", "nope"], r"block\.k_proj"])
def test_targets_matching_nothing_list_module_names(target_modules):
    expected = r"matches no nn.Linear.*block.q_proj, block.v_proj, block.up, down, lm_head"
    with pytest.raises(ValueError, match=expected):
        add_adapters(make_model(), "lora", rank=2, target_modules=target_modules)


def test_bad_target_module_types():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        add_adapters(make_model(), "lora", rank=2, target_modules="block.(q")
    with pytest.raises(TypeError, match="target_modules must be"):
        add_adapters(make_model(), "lora", rank=2, target_modules=3)
    with pytest.raises(TypeError, match="non-empty list"):
        add_adapters(make_model(), "lora", rank=2, target_modules=[])


@pytest.mark.parametrize("second_targets", ["all-linear", ["q_proj"], r"block\..*"])
def test_adapting_a_layer_twice(second_targets):
    model = make_model()
    add_adapters(model, "lora", rank=2, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="already have adapters: block.q_proj"):
        add_adapters(model, "dora", rank=2, target_modules=second_targets)
    with pytest.raises(TypeError, match="already has an adapter"):
        DoRALinear(model.block["q_proj"], rank=2)


def test_adding_adapters_to_other_layers_later_is_allowed():
    model = make_model()
    add_adapters(model, "lora", rank=2, target_modules=["q_proj"])
    assert add_adapters(model, "vera", rank=2, target_modules=["down"]) == ["down"]
    assert isinstance(model.block["q_proj"], LoRALinear) and isinstance(model.down, VeRALinear)


def test_merging_or_listing_parameters_without_adapters():
    with pytest.raises(ValueError, match="no adapters to merge"):
        merge_adapters(make_model())
    with pytest.raises(ValueError, match="no adapters"):
        adapter_parameters(make_model())


def test_bad_layer_arguments():
    with pytest.raises(TypeError, match="wraps an nn.Linear, got Conv1d"):
        LoRALinear(nn.Conv1d(4, 4, 1), rank=2)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        add_adapters(make_model(), "lora", rank=2, dropout=1.0)
    with pytest.raises(ValueError, match="alpha must be positive"):
        LoRALinear(nn.Linear(4, 4), rank=2, alpha=0.0)
    with pytest.raises(ValueError, match=r"VeRA projections have A \(2, 8\).*expected A \(2, 4\)"):
        VeRALinear(nn.Linear(4, 4), rank=2, projections=VeRAProjections(8, 4, 2))


# Parity with peft: same base and adapter weights must give the same outputs and gradients.


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


PEFT_METHODS = ["lora", "dora", "vera"]  # AdaLoRA's parity is in test_adapters_adalora.py
PEFT_NAMES = {
    "lora_A": "lora_A.default.weight",
    "lora_B": "lora_B.default.weight",
    "magnitude": "lora_magnitude_vector.default.weight",
    "lambda_d": "vera_lambda_d.default",
    "lambda_b": "vera_lambda_b.default",
    "projections.A": "vera_A.default",
    "projections.B": "vera_B.default",
}


def peft_name(name: str) -> str:
    """Our parameter/buffer name -> the matching name inside a peft model."""
    layer, _, local = name.partition(".")
    return f"base_model.model.{layer}.{PEFT_NAMES[local]}"


def build_pair(method: str, dropout: float):
    """Our adapted model and a peft model with identical base and adapter tensors."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    plain = TwoLayer()
    ours = copy.deepcopy(plain)
    if method == "vera":
        targets = ["fc2", "fc3"]  # peft's VeRA slices one A/B for all shapes, ours shares per shape
        config = peft.VeraConfig(r=3, target_modules=targets, vera_dropout=dropout)
    else:
        targets = ["fc1", "fc2", "fc3"]
        config = peft.LoraConfig(
            r=3, lora_alpha=5, target_modules=targets, lora_dropout=dropout, use_dora=method == "dora"
        )
    alpha = None if method == "vera" else 5.0
    add_adapters(ours, method, rank=3, alpha=alpha, target_modules=targets, dropout=dropout)
    randomize_adapters(ours)
    theirs = peft.get_peft_model(copy.deepcopy(plain), config)
    their_tensors = dict(theirs.named_parameters()) | dict(theirs.named_buffers())
    with torch.no_grad():
        for name, tensor in list(ours.named_parameters()) + list(ours.named_buffers()):
            if name.partition(".")[2] in PEFT_NAMES:
                their_tensors[peft_name(name)].copy_(tensor)
    return ours, theirs


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_peft_parity_eval(method):
    ours, theirs = build_pair(method, dropout=0.0)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_peft_parity_training_with_dropout_and_gradients(method):
    ours, theirs = build_pair(method, dropout=0.3)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    ours.train(), theirs.train()
    torch.manual_seed(11)
    out_ours = ours(x)
    torch.manual_seed(11)
    out_theirs = theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, atol=ATOL, rtol=1e-5)

    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    their_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, their_params[peft_name(name)].grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_peft_parity_merged(method):
    ours, theirs = build_pair(method, dropout=0.0)
    merged_theirs = theirs.merge_and_unload()
    merge_adapters(ours)
    for name in ("fc1", "fc2", "fc3"):
        torch.testing.assert_close(
            getattr(ours, name).weight, getattr(merged_theirs, name).weight, atol=ATOL, rtol=1e-5
        )
