"""torch.optim.Optimizer's contract, checked over one table of group configurations (in the style of torch's optim_db).

:data:`CONFIGS` lists every projector, update rule and lever, 32- and 8-bit moments, float32, bfloat16 and float64
weights, named and unnamed parameters; each property below runs over all of them. The properties come from torch's
documented contract (torch/optim/optimizer.py) and what ``torch/testing/_internal/common_optimizers.py`` exercises:
state_dict round trips (renumbered ids, parameter names, ``weights_only=True``), deepcopy and pickle,
``add_param_group``, closures, the step / state_dict / load_state_dict hooks, zero and missing gradients, tensor and
float learning rates, ``torch.compile`` of a step without a refresh, printing. What GaLorePlusAdamW does not support
(``fused``, ``capturable``, ``differentiable``, sparse gradients and complex weights in projected groups) is refused
with an error naming it.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from dataclasses import dataclass, field

import pytest
import torch

from galore_plus import GaLorePlusAdamW

ROWS, COLUMNS = 12, 8       # a projected weight (12, 8): 3 heads of 4 rows for cross_head
PLAIN_8BIT = (64, 64)       # a plain tensor of 4096 values: bitsandbytes' 8-bit AdamW under optim_bits=8


@dataclass(frozen=True)
class Config:
    """One optimizer: the projected group's keys, the bit width, the projected weights' dtype, named parameters."""

    name: str
    keys: dict = field(default_factory=dict)
    bits: int = 32
    dtype: torch.dtype = torch.float32
    named: bool = False


CROSS_HEAD = {"projector": "cross_head", "num_heads": 3}
RESIDUAL = {"residual_ratio": 0.1, "residual_warmup": 1}
APOLLO = {"projector": "random", "update_rule": "apollo", "scale": 1.0}
CONFIGS = [
    Config("svd", {"projector": "svd"}),
    Config("randomized_fira", {}),
    Config("randomized_no_fira", {"full_rank_residual": False, "warm_start": False}),
    Config("randomized_proj_left", {"proj_type": "left", "oversample": 2, "power_iters": 1}),
    Config("cross_head", CROSS_HEAD),
    Config("cross_head_randomized_heads", {**CROSS_HEAD, "head_projector": "randomized", "cross_head_heads": 2}),
    Config("cross_head_residual", {**CROSS_HEAD, **RESIDUAL}),
    Config("svd_residual_paper", {"projector": "svd", **RESIDUAL, "residual_mode": "paper"}),
    Config("random_galore", {"projector": "random"}),
    Config("apollo_channel", APOLLO),
    Config("apollo_mini_tensor", {**APOLLO, "rank": 1, "scale_type": "tensor", "scale": 128.0}),
    Config("moment_transfer", {"projector": "svd", "moment_transfer": True}),
    Config("adaptive_gap", {"adaptive_gap": True, "gap_patience": 1}),
    Config("scale_auto", {"scale": "auto"}),
    Config("fira_no_limiter", {"norm_growth_limit": None}),
    Config("transposed", {"projector": "svd", "transposed": True}),
    Config("basis_4bit", {"basis_bits": 4}),
    Config("svd_8bit", {"projector": "svd"}, bits=8),
    Config("cross_head_residual_8bit", {**CROSS_HEAD, **RESIDUAL}, bits=8),
    Config("apollo_8bit", APOLLO, bits=8),
    Config("randomized_bfloat16", {}, dtype=torch.bfloat16),
    Config("cross_head_residual_bfloat16", {**CROSS_HEAD, **RESIDUAL}, dtype=torch.bfloat16),
    Config("svd_8bit_bfloat16", {"projector": "svd"}, bits=8, dtype=torch.bfloat16),
    Config("svd_float64", {"projector": "svd"}, dtype=torch.float64),
    Config("randomized_residual_float64", RESIDUAL, dtype=torch.float64),
    Config("apollo_float64", APOLLO, dtype=torch.float64),
    Config("svd_named", {"projector": "svd"}, named=True),
    Config("cross_head_residual_8bit_named", {**CROSS_HEAD, **RESIDUAL}, bits=8, named=True),
]
NEEDS_BITSANDBYTES = {config.name for config in CONFIGS if config.bits == 8 or config.keys.get("basis_bits") == 4}


def config_params(configs: list[Config]):
    """Case parameters: param(config) for each config, skipping those that need bitsandbytes where it is missing."""
    cases = []
    for config in configs:
        marks = []
        if config.name in NEEDS_BITSANDBYTES:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                marks.append(pytest.mark.skip(reason="needs bitsandbytes (8-bit moments / 4-bit bases)"))
        cases.append(pytest.param(config, id=config.name, marks=marks))
    return cases


ALL = config_params(CONFIGS)


def make_params(config: Config, seed: int = 0) -> list[torch.nn.Parameter]:
    """Two projected weights (stored (in, out) for a transposed group), a bias and, for 8-bit, a large plain tensor."""
    generator = torch.Generator().manual_seed(seed)
    shape = (COLUMNS, ROWS) if config.keys.get("transposed") else (ROWS, COLUMNS)
    weights = [torch.randn(shape, generator=generator).to(config.dtype) for _ in range(2)]
    plain = [torch.randn(COLUMNS, generator=generator)]
    if config.bits == 8:
        plain.append(torch.randn(PLAIN_8BIT, generator=generator) * 0.1)
    return [torch.nn.Parameter(tensor) for tensor in weights + plain]


def make_groups(config: Config, params, weight_decay: float = 0.1) -> list[dict]:
    """A projected group of the two weights (gap 2, so refreshes happen within a few steps) and a plain group."""
    named = [(f"layer{i}.weight", p) for i, p in enumerate(params)] if config.named else list(params)
    keys = {"rank": 2, "update_proj_gap": 2, **config.keys}
    return [{"params": named[:2], "name": "projected", "weight_decay": weight_decay, **keys},
            {"params": named[2:], "weight_decay": weight_decay}]


def make_optimizer(config: Config, params, lr=1e-2, seed: int = 0, weight_decay: float = 0.1) -> GaLorePlusAdamW:
    return GaLorePlusAdamW(make_groups(config, params, weight_decay=weight_decay), lr=lr, seed=seed,
                           optim_bits=config.bits)


def gradients(params, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """``steps`` lists of gradients, one per parameter, each in its parameter's dtype."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=generator).to(p.dtype) for p in params] for _ in range(steps)]


def run(opt: torch.optim.Optimizer, params, grads) -> None:
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = grad.clone()
        opt.step()


def values(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def assert_same(a, b, what: str = "parameters") -> None:
    for position, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{what} {position} differ"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # full-rank and skipped-step warnings are tested elsewhere
        yield


@pytest.mark.parametrize("config", ALL)
def test_steps_move_every_weight_and_keep_it_finite(config):
    params = make_params(config)
    before = values(params)
    run(make_optimizer(config, params), params, gradients(params, 4))
    for old, param in zip(before, params):
        assert torch.isfinite(param).all() and not torch.equal(old, param.detach())


@pytest.mark.parametrize("config", ALL)
def test_state_dict_round_trip_with_renumbered_and_named_ids_resumes_exactly(config):
    """Save after 3 steps (through torch.save / torch.load(weights_only=True)), renumber the ids (reversed, offset)
    and add parameter names; a fresh optimizer loading it continues bit for bit as the one that never stopped."""
    params = make_params(config)
    opt = make_optimizer(config, params)
    grads = gradients(params, 6)
    run(opt, params, grads[:3])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    order = [saved_id for group in saved["param_groups"] for saved_id in group["params"]]
    renumber = {saved_id: 100 - saved_id for saved_id in order}
    saved = {"state": {renumber[k]: v for k, v in reversed(list(saved["state"].items()))},
             "param_groups": [{**group, "params": [renumber[i] for i in group["params"]],
                               "param_names": [f"saved{renumber[i]}" for i in group["params"]]}
                              for group in saved["param_groups"]]}
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = make_optimizer(config, resumed_params)
    resumed.load_state_dict(saved)
    for param, resumed_param in zip(params, resumed_params):
        for key, value in opt.state[param].items():
            other = resumed.state[resumed_param][key]
            if isinstance(value, torch.Tensor):
                assert other.dtype == value.dtype and torch.equal(other, value), key
            else:
                assert other == value, key
    run(opt, params, grads[3:])
    run(resumed, resumed_params, grads[3:])
    assert_same(params, resumed_params)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_keeps_every_public_attribute_and_steps_as_the_original(config, how):
    params = make_params(config)
    opt = make_optimizer(config, params, seed=3)
    grads = gradients(params, 5)
    run(opt, params, grads[:2])
    copied_params, copied = (copy.deepcopy((params, opt)) if how == "deepcopy"
                             else pickle.loads(pickle.dumps((params, opt))))
    public = {key for key in vars(opt) if not key.startswith("_")}
    assert public == {key for key in vars(copied) if not key.startswith("_")}
    for key in public - {"state", "param_groups"}:
        assert getattr(copied, key) == getattr(opt, key), key
    run(opt, params, grads[2:])
    run(copied, copied_params, grads[2:])
    assert_same(params, copied_params)
    copied.state_dict()


@pytest.mark.parametrize("config", ALL)
def test_a_group_added_later_steps_as_if_given_at_construction(config):
    """The plain group first, the projected group added with add_param_group: the same as both given at once (in that
    order, since a weight's position seeds its projector)."""
    params = make_params(config)
    groups = make_groups(config, params)
    later = GaLorePlusAdamW([groups[1]], lr=1e-2, optim_bits=config.bits)
    later.add_param_group(groups[0])
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference_groups = make_groups(config, reference_params)
    at_once = GaLorePlusAdamW([reference_groups[1], reference_groups[0]], lr=1e-2, optim_bits=config.bits)
    grads = gradients(params, 4)
    run(later, params, grads)
    run(at_once, reference_params, grads)
    assert_same(params, reference_params)
    assert later.param_groups[1]["rank"] == reference_groups[0]["rank"]


@pytest.mark.parametrize("config", ALL)
def test_a_closure_is_evaluated_with_grad_enabled_and_its_loss_returned(config):
    params = make_params(config)
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, reference = make_optimizer(config, params), make_optimizer(config, reference_params)
    targets = gradients(params, 3)

    def loss_of(tensors, target):
        return sum(((p.float() - t.float()) ** 2).sum() for p, t in zip(tensors, target))

    for target in targets:
        def closure():
            opt.zero_grad()
            loss = loss_of(params, target)
            loss.backward()
            return loss

        returned = opt.step(closure)
        reference.zero_grad()
        expected = loss_of(reference_params, target)
        expected.backward()
        reference.step()
        assert torch.equal(returned.detach(), expected.detach())
    assert_same(params, reference_params)


@pytest.mark.parametrize("config", ALL)
def test_hooks_run_in_torchs_order_and_see_the_restored_state(config):
    params = make_params(config)
    opt = make_optimizer(config, params)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("step_pre", o is opt)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("step_post", o is opt)))
    run(opt, params, gradients(params, 3))
    assert calls == [("step_pre", True), ("step_post", True)] * 3

    def state_dict_post(o, state_dict):
        state_dict["marked"] = True
        return state_dict

    opt.register_state_dict_pre_hook(lambda o: calls.append(("state_dict_pre", o is opt)))
    opt.register_state_dict_post_hook(state_dict_post)
    saved = opt.state_dict()
    assert saved["marked"] and calls[-1] == ("state_dict_pre", True)
    expected = copy.deepcopy({k: v for k, v in saved.items() if k != "marked"})

    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = make_optimizer(config, fresh_params)
    seen = {}

    def load_pre(o, state_dict):
        seen["pre"] = "marked" in state_dict
        return {k: v for k, v in state_dict.items() if k != "marked"}   # a pre-hook adapts the dict before the check

    def load_post(o):
        seen["post"] = {key: value.dtype for key, value in o.state[fresh_params[0]].items()
                        if isinstance(value, torch.Tensor)}

    fresh.register_load_state_dict_pre_hook(load_pre)
    fresh.register_load_state_dict_post_hook(load_post)
    fresh.load_state_dict(saved)
    assert seen["pre"] is True
    assert seen["post"] == {key: value.dtype for key, value in expected["state"][0].items()
                            if isinstance(value, torch.Tensor)}


@pytest.mark.parametrize("config", ALL)
def test_zero_gradients_change_nothing_without_weight_decay(config):
    """From the first step (refreshes of a zero gradient included), as torch's optimizers: N = 0 / (0 + eps) = 0."""
    params = make_params(config)
    opt = make_optimizer(config, params, weight_decay=0.0)
    before = values(params)
    run(opt, params, [[torch.zeros_like(p) for p in params]] * 3)
    assert_same(before, values(params))


@pytest.mark.parametrize("config", ALL)
def test_parameters_without_gradient_are_skipped_and_get_no_state(config):
    params = make_params(config)
    opt = make_optimizer(config, params)
    stepped = [params[0]] + params[2:]
    missing = params[1]
    before = missing.detach().clone()
    for step_grads in gradients(stepped, 3):
        for param, grad in zip(stepped, step_grads):
            param.grad = grad
        opt.step()
    assert torch.equal(missing.detach(), before) and len(opt.state[missing]) == 0
    assert all(len(opt.state[param]) > 0 for param in stepped)


@pytest.mark.parametrize("config", ALL)
def test_a_tensor_lr_gives_the_float_lrs_results(config):
    results = []
    for lr in (torch.tensor(2.0**-7), 2.0**-7):      # exact in float32: the same number either way
        params = make_params(config)
        run(make_optimizer(config, params, lr=lr), params, gradients(params, 4))
        results.append(values(params))
    assert_same(*results)


@pytest.mark.parametrize("config", ALL)
def test_the_optimizer_prints_its_groups(config):
    text = repr(make_optimizer(config, make_params(config)))
    assert text.startswith("GaLorePlusAdamW (") and "Parameter Group 0" in text and "Parameter Group 1" in text
    assert "rank: " in text and "projector: " in text


COMPILED = [config for config in CONFIGS if config.name in ("randomized_fira", "cross_head_residual")]


@pytest.mark.parametrize("config", COMPILED, ids=[config.name for config in COMPILED])
def test_a_step_without_a_refresh_compiles_to_one_graph_with_the_same_result(config):
    """torch.compile(opt.step, fullgraph=True) of a step without a refresh (a refresh decides on the host, so it may
    break the graph; not compiled here): no graph break, the same weights as the uncompiled step. Dynamo only
    (backend "eager"): inductor's code generation would take minutes on a CPU. Two configurations, as each compile
    takes seconds: the GaLore+ defaults (Fira's residual) and cross_head with the sparse residual (past its warm-up)."""
    params = make_params(config)
    projected = params[:2]
    groups = [{"params": projected, "rank": 2, "update_proj_gap": 100, **config.keys}]
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in projected]
    opt = GaLorePlusAdamW(groups, lr=1e-2)
    reference = GaLorePlusAdamW([{**groups[0], "params": reference_params}], lr=1e-2)
    grads = gradients(projected, 4)
    run(opt, projected, grads[:2])
    run(reference, reference_params, grads[:2])
    torch._dynamo.reset()
    compiled = torch.compile(opt.step, fullgraph=True, backend="eager")
    for step_grads in grads[2:]:
        before = values(reference_params)
        for param, reference_param, grad in zip(projected, reference_params, step_grads):
            param.grad, reference_param.grad = grad.clone(), grad.clone()
        compiled()
        reference.step()
        for param, reference_param, old in zip(projected, reference_params, before):
            # the graph may fold Python-number arithmetic in another order: a few roundings of the update's size
            moved = float((reference_param.detach() - old).abs().max())
            torch.testing.assert_close(param.detach(), reference_param.detach(), rtol=0,
                                       atol=8 * torch.finfo(torch.float32).eps * (moved + float(old.abs().max())))
            param.data.copy_(reference_param.detach())    # each step compared from the same weights


@pytest.mark.parametrize("flag", ["fused", "capturable", "differentiable"])
def test_unsupported_torch_flags_are_refused_by_name(flag):
    params = make_params(CONFIGS[0])
    with pytest.raises(TypeError, match=f"{flag}=True is not supported by GaLorePlusAdamW"):
        GaLorePlusAdamW(make_groups(CONFIGS[0], params), **{flag: True})
    groups = make_groups(CONFIGS[0], params)
    groups[0][flag] = True
    with pytest.raises(ValueError, match=f"param group 0 \\('projected'\\), key '{flag}': .*not supported"):
        GaLorePlusAdamW(groups)


def test_sparse_gradients_and_complex_weights_are_refused_in_projected_groups():
    params = make_params(CONFIGS[0])
    opt = make_optimizer(CONFIGS[0], params)
    params[0].grad = torch.randn(ROWS, COLUMNS).to_sparse()
    with pytest.raises(TypeError, match="key 'rank': projected weights need dense real gradients, got a sparse"):
        opt.step()
    complex_weight = torch.nn.Parameter(torch.randn(ROWS, COLUMNS, dtype=torch.complex64))
    with pytest.raises(TypeError, match="key 'rank': parameter 0 .* has dtype torch.complex64"):
        GaLorePlusAdamW([{"params": [complex_weight], "rank": 2}])
