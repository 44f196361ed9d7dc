"""The one per-weight step: its extension points (projectors, update rules, refresh hooks) and the module graph."""

import ast
import itertools
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import galore_plus
from galore_plus import GaLorePlusAdamW
from galore_plus import APOLLO, projectors, rules
from galore_plus.step import row_blocks, weight_step
from galore_plus.step.layouts import LocalLayout
from galore_plus.projectors import PROJECTORS
from galore_plus.projectors.base import Projector
from galore_plus.projectors.cross_head import head_rows
from galore_plus.projectors.generators import basis_generator
from galore_plus.projectors.random import random_orthonormal_basis
from galore_plus.projectors.svd import svd_basis
from support import HostReads


def gradients(shape, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


def package_imports() -> dict[str, set[str]]:
    """Module -> galore_plus modules it imports (relative and absolute, type-checking imports included)."""
    root = Path(galore_plus.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        module = ".".join(("galore_plus",) + path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                if target and target.startswith("galore_plus"):
                    imported.add(target)
                    imported.update(f"{target}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names if alias.name.startswith("galore_plus"))
        graph[module] = imported
    return {module: {target for target in targets if target in graph} - {module} for module, targets in graph.items()}


def test_package_modules_import_each_other_without_a_cycle():
    graph = package_imports()
    assert "galore_plus.optimizer" not in graph["galore_plus.step.layouts"]
    assert "galore_plus.step.layouts" in graph["galore_plus.optimizer"]  # the walk sees relative imports
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join(path + [module])}"
        state[module] = "open"
        for target in graph[module]:
            if target != "galore_plus":
                visit(target, path + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])


def test_no_module_calls_a_private_method_of_the_optimizer():
    root = Path(galore_plus.__file__).parent
    for path in root.rglob("*.py"):
        if path.name == "optimizer.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = getattr(node.value, "attr", getattr(node.value, "id", None))
                assert owner != "optimizer", f"{path.name}: optimizer.{node.attr}"


def test_local_layout_reads_the_cross_head_rows_the_basis_function_reads():
    grad = torch.randn(32, 12)
    group = {"rank": 6, "num_heads": 8, "head_dim": None}
    generator = basis_generator(0, 0, 0, grad.device)
    rows = PROJECTORS["cross_head"].rows(group, (32, 12), generator)
    heads = torch.unique(rows // 4)
    assert rows.numel() == 8 and heads.numel() == 2  # ceil(6 / 4) heads of 4 rows
    weight = torch.nn.Parameter(torch.zeros(12, 32))
    weight.grad = grad.t()
    read = LocalLayout(weight, transposed=True).read_rows(rows)
    assert torch.equal(read, head_rows(grad, 8, heads))
    assert torch.equal(torch.randn(3, generator=generator), torch.randn(3, generator=basis_generator(0, 0, 0, grad.device)))


def test_the_galore_rule_is_the_default_and_an_unknown_rule_names_the_group_and_key():
    weight = torch.nn.Parameter(torch.randn(8, 6))
    opt = GaLorePlusAdamW([{"params": [weight], "rank": 2}])
    assert opt.param_groups[0]["update_rule"] == "galore"
    with pytest.raises(ValueError, match=r"param group 0 \('w'\), key 'update_rule': must be one of \('galore',"):
        GaLorePlusAdamW([{"params": [weight], "rank": 2, "name": "w", "update_rule": "sgd"}])


def test_a_registered_update_rule_gets_the_step_and_replaces_the_galore_update(monkeypatch):
    seen = []

    def sign_descent(inputs, state, group):
        seen.append((inputs.step, inputs.side, tuple(inputs.low_rank.shape), tuple(inputs.basis.shape)))
        state["rule_calls"] = state.get("rule_calls", 0) + 1
        inputs.weight.sub_(group["lr"] * inputs.grad.sign())

    monkeypatch.setitem(rules.UPDATE_RULES, "sign", rules.UpdateRule(sign_descent))
    weight = torch.nn.Parameter(torch.randn(10, 6))
    start = weight.detach().clone()
    opt = GaLorePlusAdamW([{"params": [weight], "rank": 3, "update_rule": "sign", "projector": "svd"}], lr=0.1)
    grads = gradients((10, 6), 3)
    for grad in grads:
        weight.grad = grad
        opt.step()
    assert seen == [(1, "right", (10, 3), (3, 6)), (2, "right", (10, 3), (3, 6)), (3, "right", (10, 3), (3, 6))]
    assert opt.state[weight]["rule_calls"] == 3
    torch.testing.assert_close(weight.detach(), start - 0.1 * sum(g.sign() for g in grads))


def test_a_projector_without_a_stored_basis_is_regenerated_every_step_from_the_seeded_generator(monkeypatch):
    calls = []

    def seeded_random(read, shape, group, side, generator, previous):
        calls.append((read, previous))
        return random_orthonormal_basis(shape, group["rank"], side, generator, torch.device("cpu"))

    monkeypatch.setitem(PROJECTORS, "seeded_random", Projector(seeded_random, stores_basis=False))
    weight = torch.nn.Parameter(torch.randn(12, 8))
    opt = GaLorePlusAdamW([{"params": [weight], "rank": 3, "projector": "seeded_random", "update_proj_gap": 2}], seed=5)
    reference = weight.detach().clone()
    moments = None
    for t, grad in enumerate(gradients((12, 8), 4), start=1):
        weight.grad = grad
        opt.step()
        basis = random_orthonormal_basis((12, 8), 3, "right", basis_generator(5, 0, (t - 1) // 2, weight.device), weight.device)
        low_rank = grad @ basis.t()
        moments = (low_rank * 0.1, low_rank.square() * 0.001) if moments is None else (
            0.9 * moments[0] + 0.1 * low_rank, 0.999 * moments[1] + 0.001 * low_rank.square())
        direction = (moments[0] / (1 - 0.9**t)) / ((moments[1] / (1 - 0.999**t)).sqrt() + 1e-8)
        reference = reference * (1 - 1e-3 * 1e-2) - 1e-3 * 0.25 * direction @ basis
        torch.testing.assert_close(weight.detach(), reference, atol=1e-6, rtol=1e-6)
    assert calls == [(None, None)] * 4
    assert "projector" not in opt.state[weight]


@pytest.mark.parametrize("rule, full_rank_residual", [("probe", False), ("galore", True), ("galore", False)])
def test_update_rules_get_the_gradient_itself_in_the_weights_dtype(monkeypatch, rule, full_rank_residual):
    """UpdateInputs' contract: a rule reads the gradient in the parameter's dtype, the tensor itself (no whole float32
    copy of a bfloat16 gradient is made for it; rules read it a block of rows at a time)."""
    seen = []
    real = rules.UPDATE_RULES["galore"]

    def recording(inputs, state, group):
        seen.append(inputs.grad)
        real.apply(inputs, state, group)

    monkeypatch.setitem(rules.UPDATE_RULES, rule, rules.UpdateRule(recording, real.direction, keys=real.keys))
    weight = torch.nn.Parameter(torch.randn(10, 6).bfloat16())
    opt = GaLorePlusAdamW([{"params": [weight], "rank": 3, "update_rule": rule, "projector": "svd",
                            "full_rank_residual": full_rank_residual}], lr=0.1)
    weight.grad = torch.randn(10, 6).bfloat16()
    start = weight.detach().clone()
    opt.step()
    assert seen[0].dtype == torch.bfloat16 and seen[0].data_ptr() == weight.grad.data_ptr()
    assert not torch.equal(weight.detach(), start)


def test_refresh_hooks_run_at_every_refresh_that_replaces_a_basis(monkeypatch):
    seen = []

    def hook(exp_avg, exp_avg_sq, previous, basis, side, state, group):
        seen.append((state["step"], previous.clone(), basis.clone(), exp_avg.clone()))
        exp_avg.zero_()

    monkeypatch.setattr(weight_step, "REFRESH_HOOKS", [hook])
    weight = torch.nn.Parameter(torch.randn(12, 8))
    opt = GaLorePlusAdamW([{"params": [weight], "rank": 3, "projector": "svd", "update_proj_gap": 2}])
    bases, moments = [], []
    for grad in gradients((12, 8), 5):
        weight.grad = grad
        opt.step()
        bases.append(opt.state[weight]["projector"].clone())
        moments.append(opt.state[weight]["exp_avg"].clone())
    assert [entry[0] for entry in seen] == [2, 4]  # hooks see the state before steps t = 3 and t = 5
    for (_, previous, basis, exp_avg), t in zip(seen, (3, 5)):
        assert torch.equal(previous, bases[t - 2]) and torch.equal(basis, bases[t - 1])
        assert not torch.equal(previous, basis)
        assert torch.equal(exp_avg, moments[t - 2]) and exp_avg.abs().sum() > 0
    low_rank = gradients((12, 8), 5)[2] @ bases[2].t()
    torch.testing.assert_close(moments[2], 0.1 * low_rank)  # the hook's zeroing reached the moments of step 3


def test_compute_basis_dispatches_through_the_registry():
    grad = torch.randn(16, 12)
    group = {"rank": 4, "projector": "svd", "warm_start": True}
    generator = basis_generator(0, 0, 0, grad.device)
    assert torch.equal(projectors.compute_basis(grad, (16, 12), group, "right", generator, None),
                       svd_basis(grad, 4, "right"))
    assert set(PROJECTORS) == {"svd", "randomized", "cross_head", "random"}


# ---------------------------------------------------------------- a non-finite value is never written


# Every projector, residual mode, bit width and update rule, but the rules other than 'galore' with a sparse residual
# (which they refuse: tests/test_apollo_update.py, tests/test_muon_update.py, tests/test_field_rules.py).
STEP_CASES = [(projector, mode, bits, rule) for projector, mode, bits, rule in itertools.product(
    sorted(PROJECTORS), [None, "exact", "paper"], [32, 8], sorted(rules.UPDATE_RULES))
    if not (rule != "galore" and mode is not None)]


def bad_gradient_stream(shape, rule, seed=0):
    """(gradient, whether it is bad for ``rule``) for 12 steps: NaN, +-Inf, and huge values whose squares overflow
    float32 (bad for the rules with a second moment; 'muon' and 'scale' keep none and normalise, so for them that step
    is good)."""
    generator = torch.Generator().manual_seed(seed)
    stream = []
    for t in range(12):
        grad = torch.randn(shape, generator=generator)
        bad = t in ((4, 5, 7, 9) if rule in ("muon", "scale") else (2, 4, 5, 7, 9))
        if t == 2:
            grad = grad * 1e21  # R finite, R * R and the residual's products overflow
        elif t == 4:
            grad[1, 2] = float("nan")
        elif t == 5:
            grad[0] = float("inf")
        elif t == 7:
            grad = grad * 3e38  # overflows in the projection itself
        elif t == 9:
            grad[3, 1] = -float("inf")
        stream.append((grad, bad))
    return stream


@pytest.mark.parametrize("projector, mode, bits, rule", STEP_CASES)
def test_no_non_finite_value_is_ever_written_and_a_bad_step_changes_nothing(projector, mode, bits, rule):
    if bits == 8:
        pytest.importorskip("bitsandbytes")
    weight = torch.nn.Parameter(torch.randn(16, 12))
    group = {"params": [weight], "rank": 4, "update_proj_gap": 3, "projector": projector, "update_rule": rule}
    if projector == "cross_head":
        group["num_heads"] = 4
    if mode is not None:
        group.update(residual_ratio=0.1, residual_warmup=1, residual_mode=mode)
    opt = GaLorePlusAdamW([group], lr=1e-2, weight_decay=0.1, optim_bits=bits)
    good_steps = 0
    with pytest.warns(RuntimeWarning):
        for grad, bad in bad_gradient_stream((16, 12), rule):
            before = weight.detach().clone()
            moments = {k: v.clone() for k, v in opt.state[weight].items() if torch.is_tensor(v) and k != "projector"}
            weight.grad = grad
            opt.step()
            assert torch.isfinite(weight).all()
            state = opt.state[weight]
            for key, value in state.items():
                if torch.is_tensor(value) and value.is_floating_point():
                    assert torch.isfinite(value).all(), key
            if bad:
                assert torch.equal(weight, before)
                for key, value in moments.items():
                    assert torch.equal(state[key], value), key
            else:
                good_steps += not torch.equal(weight, before)
        opt.state_dict()
    assert good_steps == 12 - sum(bad for _, bad in bad_gradient_stream((16, 12), rule))
    assert opt.state[weight]["step"] == 12
    if mode is not None:
        assert opt.state[weight]["residual_step"] == 11


def test_paper_residual_with_overflowing_products_writes_nothing_at_i():
    weight = torch.nn.Parameter(torch.randn(16, 12))
    opt = GaLorePlusAdamW([{"params": [weight], "rank": 4, "projector": "svd", "residual_ratio": 0.2,
                            "residual_warmup": 1, "residual_mode": "paper"}], lr=1e-2)
    weight.grad = torch.randn(16, 12)
    opt.step()
    before = weight.detach().clone()
    weight.grad = torch.randn(16, 12) * 1e21
    opt.step()
    assert torch.isfinite(weight).all() and torch.equal(weight, before)
    assert torch.isfinite(opt.state[weight]["residual_exp_avg_sq"]).all()


# ---------------------------------------------------------------- no host read on a step without a refresh


@pytest.mark.parametrize("projector, mode, bits, rule", STEP_CASES)
def test_steps_without_a_refresh_read_nothing_on_the_host(projector, mode, bits, rule):
    if bits == 8:
        pytest.importorskip("bitsandbytes")
    tall = torch.nn.Parameter(torch.randn(16, 12))  # right side (left too for cross_head's rows)
    wide = torch.nn.Parameter(torch.randn(12, 16, dtype=torch.bfloat16))  # left side for svd / randomized
    group = {"params": [tall, wide], "rank": 4, "update_proj_gap": 3, "projector": projector, "update_rule": rule,
             "head_dim": 4 if projector == "cross_head" else None}
    if mode is not None:
        group.update(residual_ratio=0.1, residual_warmup=1, residual_mode=mode)
    opt = GaLorePlusAdamW([group], lr=1e-2, weight_decay=0.1, optim_bits=bits)
    reads = {}
    for t in range(1, 9):
        tall.grad, wide.grad = torch.randn(16, 12), torch.randn(12, 16, dtype=torch.bfloat16)
        if t == 5:
            tall.grad[2, 3] = float("nan")
        before = tall.detach().clone()
        with warnings.catch_warnings(), HostReads() as recorder:
            warnings.simplefilter("ignore")
            opt.step()
        reads[t] = recorder.calls
        assert torch.equal(tall, before) == (t == 5)
    if not PROJECTORS[projector].stores_basis:  # a regenerated basis: a refresh reads nothing either
        assert {t: calls for t, calls in reads.items() if t != 1} == {t: [] for t in range(2, 9)}
        return
    assert {t: calls for t, calls in reads.items() if t not in (1, 4, 7)} == {2: [], 3: [], 5: [], 6: [], 8: []}
    assert all(reads[t] for t in (4, 7))  # the recorder sees a refresh's reads


class NewTensorSizes(TorchDispatchMode):
    """Records the number of values of every tensor an operation allocates (outputs that share no input's storage)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in storages:
                self.sizes.append(tensor.numel())
        return out


@pytest.mark.parametrize("optim_bits", [32, 8])
@pytest.mark.parametrize("keys", [{"full_rank_residual": True}, {"full_rank_residual": False}, dict(APOLLO)],
                         ids=["fira", "galore", "apollo"])
def test_a_step_without_refresh_allocates_no_full_size_tensor_for_a_bfloat16_weight(monkeypatch, keys, optim_bits):
    """Blocks of 8 rows: no tensor of the step is larger than a block of a 64 x 48 weight, or than one of the
    low-rank ones (64 x 4), though the update is full-rank (Fira, APOLLO) and the weight changes."""
    monkeypatch.setattr(row_blocks, "ROW_BLOCK_VALUES", 8 * 48)
    weight = torch.nn.Parameter(torch.randn(64, 48).bfloat16())
    opt = GaLorePlusAdamW([{"params": [weight], "rank": 4, "update_proj_gap": 100, "projector": "randomized",
                            **keys}], lr=0.1, optim_bits=optim_bits)
    weight.grad = torch.randn(64, 48).bfloat16()
    opt.step()
    weight.grad = torch.randn(64, 48).bfloat16()
    start = weight.detach().clone()
    with NewTensorSizes() as recorded:
        opt.step()
    assert not torch.equal(weight.detach(), start)
    assert recorded.sizes and max(recorded.sizes) <= 8 * 48
