"""The one per-weight step: its extension points (projectors, update rules, refresh hooks) and the module graph."""

import ast
from pathlib import Path

import pytest
import torch

import galore_plus
from galore_plus import GaLorePlusAdamW
from galore_plus import projectors, update_rules, weight_step
from galore_plus.distributed import LocalLayout
from galore_plus.projectors import PROJECTORS, Projector, basis_generator, head_rows, random_orthonormal_basis


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
    assert "galore_plus.optimizer" not in graph["galore_plus.distributed"]
    assert "galore_plus.distributed" in graph["galore_plus.optimizer"]  # the walk sees relative imports
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

    monkeypatch.setitem(update_rules.UPDATE_RULES, "sign", sign_descent)
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
                       projectors.svd_basis(grad, 4, "right"))
    assert set(PROJECTORS) == {"svd", "randomized", "cross_head", "random"}
