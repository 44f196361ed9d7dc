"""Parameter-group keys and hyperparameters are checked when the optimizer is built, naming group and key."""

import dataclasses
import warnings

import pytest
import torch

from galore_plus import GaLorePlusAdamW
from galore_plus import group_options
from galore_plus.group_keys import GroupKey


def param(*shape):
    return torch.nn.Parameter(torch.zeros(*shape))


def build(extra: dict, **kwargs) -> GaLorePlusAdamW:
    return GaLorePlusAdamW([{"params": [param(3)]}, {"params": [param(8, 8)], "name": "attn", **extra}], **kwargs)


@pytest.mark.parametrize("group, misspelled, suggestion", [
    ({"rank": 2, "update_proj_gaps": 10}, "update_proj_gaps", "update_proj_gap"),
    ({"rank": 2, "residual_ration": 0.01}, "residual_ration", "residual_ratio"),
    ({"weight_decya": 0.0}, "weight_decya", "weight_decay"),
    ({"rank": 2, "amsgrad": True}, "amsgrad", None),
])
def test_unknown_group_keys_are_refused_with_the_closest_valid_key(group, misspelled, suggestion):
    with pytest.raises(ValueError) as info:
        build(group)
    message = str(info.value)
    assert f"param group 1 ('attn'), key '{misspelled}': is not a parameter-group key" in message
    if suggestion is None:
        assert "did you mean" not in message
    else:
        assert f"did you mean '{suggestion}'?" in message


def test_a_key_added_to_the_defaults_is_valid_where_a_registry_entry_declares_it(monkeypatch):
    """Who reads a key comes from the entries' ``keys``: declared by the default projector, a new key is accepted
    there, refused in an svd group (naming the projector that reads it) and in a plain group."""
    entry = group_options.PROJECTORS["randomized"]
    monkeypatch.setitem(group_options.PROJECTORS, "randomized",
                        dataclasses.replace(entry, keys={**entry.keys, "new_knob": GroupKey(1)}))
    opt = build({"rank": 2, "new_knob": 3})
    assert opt.param_groups[1]["new_knob"] == 3
    with pytest.raises(ValueError, match="key 'new_knob': projector 'svd' and update rule 'galore' do not read it, so "
                                         "it would change nothing; it is read by projector 'randomized'"):
        build({"rank": 2, "projector": "svd", "new_knob": 3})
    with pytest.raises(ValueError, match="key 'new_knob': is only meaningful in a projected group"):
        build({"new_knob": 3})


@pytest.mark.parametrize("group, key, readers", [
    ({"projector": "svd", "oversample": 99}, "oversample", "projector 'randomized', projector 'cross_head'"),
    ({"projector": "svd", "num_heads": 4}, "num_heads", "projector 'cross_head'"),
    ({"projector": "svd", "scale_type": "tensor"}, "scale_type", "update rule 'apollo'"),
    ({"projector": "randomized", "scale_type": "tensor"}, "scale_type", "update rule 'apollo'"),
    ({"projector": "cross_head", "num_heads": 2, "proj_type": "left"}, "proj_type", "projector 'svd'"),
    ({"projector": "random", "moment_transfer": True}, "moment_transfer", "projector 'svd'"),
    ({"projector": "random", "update_rule": "apollo", "norm_growth_limit": 2.0}, "norm_growth_limit",
     "update rule 'galore'"),
])
def test_a_key_the_groups_projector_and_rule_never_read_is_refused_naming_who_reads_it(group, key, readers):
    with pytest.raises(ValueError, match=rf"param group 1 \('attn'\), key '{key}': projector .* do not read it.*read by {readers}"):
        build({"rank": 2, **group})


@pytest.mark.parametrize("group", [{"projector": "svd"}, {"projector": "cross_head", "num_heads": 2},
                                   {"projector": "random", "update_rule": "apollo"}])
def test_groups_copied_from_a_built_optimizer_are_accepted_again(group):
    """A built group holds every key at its default, read or not; a key at its default changes nothing, so it is
    accepted (only a tuned value of a key nobody reads is refused)."""
    first = build({"rank": 2, **group})
    again = GaLorePlusAdamW([dict(g) for g in first.param_groups])
    assert again.param_groups[1] == first.param_groups[1]


def test_every_projector_key_is_read_by_every_step_or_declared_by_an_entry():
    declared = set(group_options.STEP_KEYS)
    for table in (group_options.PROJECTORS, group_options.UPDATE_RULES):
        declared |= {key for entry in table.values() for key in entry.keys}
    assert declared == set(group_options.projector_only_keys())


def test_scheduler_and_named_parameter_keys_are_accepted():
    weight = param(8, 8)
    opt = GaLorePlusAdamW([{"params": [weight], "rank": 2, "initial_lr": 1e-3, "param_names": ["w"]}])
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    assert opt.param_groups[0]["initial_lr"] == 1e-3


@pytest.mark.parametrize("key, value, error, words", [
    ("lr", "1e-3", TypeError, "must be a number, got '1e-3' (a string: YAML"),
    ("lr", -1.0, ValueError, "must be a finite number >= 0"),
    ("lr", float("nan"), ValueError, "must be a finite number >= 0"),
    ("eps", "1e-8", TypeError, "must be a number"),
    ("weight_decay", None, TypeError, "must be a number"),
    ("weight_decay", -0.1, ValueError, "must be a finite number >= 0"),
    ("betas", (0.9,), TypeError, "must be a pair"),
    ("betas", (0.9, "0.999"), TypeError, "beta2 must be a number"),
    ("betas", (0.9, 1.0), ValueError, "beta2 must be in [0, 1)"),
    ("foreach", "yes", TypeError, "must be None, True or False"),
])
@pytest.mark.parametrize("projected", [True, False])
def test_bad_hyperparameters_in_a_group_raise_at_construction_naming_group_and_key(key, value, error, words, projected):
    with pytest.raises(error) as info:
        build({key: value, **({"rank": 2} if projected else {})})
    assert f"param group 1 ('attn'), key '{key}': {words}" in str(info.value)


@pytest.mark.parametrize("key, value, error", [("lr", "1e-3", TypeError), ("betas", (0.9, 1.5), ValueError),
                                               ("eps", -1.0, ValueError), ("weight_decay", "0.01", TypeError)])
def test_bad_constructor_hyperparameters_name_the_argument(key, value, error):
    with pytest.raises(error, match=rf"GaLorePlusAdamW\(\.\.\.\), key '{key}'"):
        GaLorePlusAdamW([{"params": [param(8, 8)], "rank": 2}], **{key: value})


def test_tensor_learning_rate_is_accepted_as_in_torch():
    GaLorePlusAdamW([{"params": [param(8, 8)], "rank": 2}], lr=torch.tensor(1e-3))


def test_group_keys_given_to_the_constructor_point_to_groups():
    with pytest.raises(TypeError) as info:
        GaLorePlusAdamW([param(8, 8)], rank=16)
    assert "'rank' is a parameter-group key" in str(info.value) and "make_param_groups" in str(info.value)
    with pytest.raises(TypeError, match="unexpected keyword argument 'weight_decya' \\(did you mean 'weight_decay'\\?\\)"):
        GaLorePlusAdamW([param(8, 8)], weight_decya=0.1)


def test_an_optimizer_without_projected_groups_warns_that_it_is_plain_adamw():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32))
    with pytest.warns(UserWarning, match=r"plain AdamW: the moments of its 1 2-D weights \(16.0 KiB\).*make_param_groups"):
        GaLorePlusAdamW(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GaLorePlusAdamW([{"params": [model[0].weight], "rank": 4}, {"params": list(model[1].parameters())}])
        GaLorePlusAdamW([param(3)])


@pytest.mark.parametrize("shape, group, full", [
    ((8, 16), {"rank": 8}, True),
    ((8, 16), {"rank": 7}, False),
    ((8, 16), {"rank": 8, "proj_type": "right"}, False),
    ((8, 16), {"rank": 8, "transposed": True, "projector": "cross_head", "num_heads": 2}, True),
    ((8, 16), {"rank": 7, "transposed": True, "projector": "cross_head", "num_heads": 2}, False),
])
def test_a_rank_not_below_the_projected_side_warns_that_nothing_is_saved(shape, group, full):
    weights = [param(*shape), param(*shape)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GaLorePlusAdamW([{"params": weights, "name": "mlp", **group}])
    messages = [str(w.message) for w in caught]
    if full:
        assert len(messages) == 1
        assert f"param group 0 ('mlp'), key 'rank': rank {group['rank']} is not below the projected side of 2 weight(s)" in messages[0]
        assert f"parameter 1 {shape}" in messages[0] and "saves no memory" in messages[0]
    else:
        assert messages == []
