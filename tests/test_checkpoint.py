"""load_state_dict refuses foreign and mismatched checkpoints before changing anything, and refills missing keys."""

import copy
import warnings

import pytest
import torch

from galore_plus import GaLorePlusAdamW


def weights(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(24, 16, generator=generator)),
            torch.nn.Parameter(torch.randn(16, generator=generator))]


def groups(params, **projected) -> list[dict]:
    return [{"params": [params[0]], "name": "attn", "rank": 8, "update_proj_gap": 2, **projected},
            {"params": [params[1]]}]


def train(opt: torch.optim.Optimizer, params, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        opt.step()


def trained_state(steps: int = 3, **projected) -> dict:
    params = weights()
    opt = GaLorePlusAdamW(groups(params, **projected), lr=1e-2)
    train(opt, params, steps)
    return copy.deepcopy(opt.state_dict())


def fresh(**projected):
    params = weights()
    return params, GaLorePlusAdamW(groups(params, **projected), lr=1e-2)


def assert_unchanged_by_failed_load(opt, state_dict, error_words):
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(state_dict)
    for words in error_words:
        assert words in str(info.value)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()


def test_galore_torch_checkpoint_is_refused_with_a_clear_message():
    galore_torch = pytest.importorskip("galore_torch")
    params = weights()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = galore_torch.GaLoreAdamW([{"params": [params[0]], "rank": 8, "update_proj_gap": 2, "scale": 0.25,
                                            "proj_type": "std"}, {"params": [params[1]]}], lr=1e-2)
    train(theirs, params, 2)
    _, opt = fresh()
    assert_unchanged_by_failed_load(opt, theirs.state_dict(), ["key 'correct_bias'", "not a GaLorePlusAdamW checkpoint"])
    state_dict = copy.deepcopy(theirs.state_dict())
    for group in state_dict["param_groups"]:
        del group["correct_bias"]
    assert_unchanged_by_failed_load(opt, state_dict, ["param group 0 ('attn'), parameter 0 of shape (24, 16), state key "
                                                      "'projector': holds a GaLoreProjector object"])


def test_a_checkpoint_of_another_rank_is_refused_and_the_rank_kept():
    params, opt = fresh(rank=4)
    assert_unchanged_by_failed_load(opt, trained_state(), [
        "param group 0 ('attn'), key 'rank': the checkpoint was saved with rank=8, this optimizer's group has rank=4",
        "build the optimizer with rank=8"])
    assert opt.param_groups[0]["rank"] == 4
    train(opt, params, 1)
    assert opt.state[params[0]]["projector"].shape == (4, 16)


@pytest.mark.parametrize("key, value", [("projector", "svd"), ("proj_type", "left"), ("residual_ratio", 0.05)])
def test_a_checkpoint_with_other_projector_keys_is_refused(key, value):
    _, opt = fresh(**{key: value})
    assert_unchanged_by_failed_load(opt, trained_state(), [f"key '{key}': the checkpoint was saved with"])


def test_a_checkpoint_of_other_shapes_is_refused_naming_the_state_key():
    saved = trained_state()
    saved["state"][0]["projector"] = torch.zeros(8, 20)
    _, opt = fresh()
    assert_unchanged_by_failed_load(opt, saved, ["parameter 0 of shape (24, 16), state key 'projector'",
                                                 "has shape (8, 20), this optimizer expects (8, 16) (rank 8)"])
    saved = trained_state()
    saved["state"][1]["exp_avg"] = torch.zeros(17)
    assert_unchanged_by_failed_load(opt, saved, ["param group 1, parameter 0 of shape (16,), state key 'exp_avg'"])


def test_projected_and_plain_groups_must_be_in_the_same_places():
    params = weights()
    opt = GaLorePlusAdamW([{"params": [params[0]]}, {"params": [params[1]]}], lr=1e-2)
    assert_unchanged_by_failed_load(opt, trained_state(), ["param group 0: the checkpoint projects it (rank 8) but "
                                                           "this optimizer keeps it in plain AdamW"])


def test_group_and_parameter_counts_must_match():
    params = weights()
    opt = GaLorePlusAdamW([{"params": params[:1], "rank": 8}], lr=1e-2)
    assert_unchanged_by_failed_load(opt, trained_state(), ["the checkpoint has 2 parameter groups, this optimizer 1"])
    with pytest.raises(ValueError, match="expected an optimizer state dict"):
        opt.load_state_dict({"model": {}})


def test_a_plain_step_saved_as_a_number_loads_as_torch_loads_it():
    """Older torch checkpoints keep a plain tensor's ``step`` as a Python number: torch's AdamW turns it into a
    tensor (Adam.__setstate__), and so do we; both then take the same step."""
    saved = trained_state()
    saved["state"][1]["step"] = 3
    params, opt = fresh()
    opt.load_state_dict(saved)
    reference = torch.nn.Parameter(params[1].detach().clone())
    theirs = torch.optim.AdamW([reference], lr=1e-2)
    group = {**theirs.state_dict()["param_groups"][0], "params": [0]}
    theirs.load_state_dict({"state": {0: copy.deepcopy(saved["state"][1])}, "param_groups": [group]})
    ours_step, their_step = opt.state[params[1]]["step"], theirs.state[reference]["step"]
    assert isinstance(ours_step, torch.Tensor) and ours_step.dtype == their_step.dtype and float(ours_step) == 3.0
    grad = torch.randn(16, generator=torch.Generator().manual_seed(5))
    params[0].grad, params[1].grad, reference.grad = torch.randn(24, 16), grad.clone(), grad.clone()
    opt.step()
    theirs.step()
    assert torch.equal(params[1].detach(), reference.detach())


def test_keys_missing_from_an_older_checkpoint_are_refilled_and_it_resumes_exactly():
    """A checkpoint saved before a key existed (here: foreach, residual_mode, name) loads and continues bit for bit."""
    straight_params = weights()
    straight = GaLorePlusAdamW(groups(straight_params), lr=1e-2)
    train(straight, straight_params, 3)
    saved = copy.deepcopy(straight.state_dict())
    snapshot = [p.detach().clone() for p in straight_params]
    train(straight, straight_params, 2, seed=2)
    for group in saved["param_groups"]:
        for key in ("foreach", "residual_mode", "name"):
            group.pop(key, None)
    resumed_params = [torch.nn.Parameter(p.clone()) for p in snapshot]
    resumed = GaLorePlusAdamW(groups(resumed_params), lr=1e-2)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[1]["foreach"] is None and resumed.param_groups[0]["residual_mode"] == "exact"
    train(resumed, resumed_params, 2, seed=2)
    for mine, expected, before in zip(resumed_params, straight_params, snapshot):
        assert not torch.equal(expected, before)
        assert torch.equal(mine, expected)


def test_scheduler_keys_present_on_both_sides_are_accepted():
    params, opt = fresh()
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    source_params = weights()
    source = GaLorePlusAdamW(groups(source_params), lr=1e-2)
    torch.optim.lr_scheduler.OneCycleLR(source, max_lr=0.1, total_steps=10)
    train(source, source_params, 2)
    opt.load_state_dict(source.state_dict())
    assert torch.equal(opt.state[params[0]]["projector"], source.state[source_params[0]]["projector"])


def test_a_checkpoint_with_scheduler_keys_loads_before_the_scheduler_is_rebuilt():
    source_params = weights()
    source = GaLorePlusAdamW(groups(source_params), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(source, max_lr=0.1, total_steps=10)
    train(source, source_params, 2)
    scheduler.step()
    params, opt = fresh()
    opt.load_state_dict(source.state_dict())
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, last_epoch=0)
    assert opt.param_groups[0]["max_lr"] == 0.1
