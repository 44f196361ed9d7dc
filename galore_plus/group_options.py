"""Defaults and validation of parameter-group keys, done when a group is added to the optimizer.

* every key must be one the optimizer reads (a misspelling gets the closest valid key, by difflib);
  the valid keys are those every projected step reads (:data:`STEP_KEYS`) and those the entries of
  ``PROJECTORS`` and ``UPDATE_RULES`` declare (their ``keys``, with defaults and checks: :func:`declared_keys`);
* a projected group may set only keys that every step reads or that its projector or update rule
  declares: a key read only by other entries raises, naming the entries that read it;
* ``lr``, ``betas``, ``eps``, ``weight_decay`` must be valid numbers, in every group;
* a projected group (one that has ``rank``) gets its defaults and every projector key checked (each
  key's own check, then the entries' checks across keys and of each weight); a ``rank`` not below the
  side a weight projects is warned about (it saves no memory).

Every error names the parameter group (its index, and its ``name`` key if it has one) and the key
at fault, so a mistake in a 200-group configuration is found at once.
"""

from __future__ import annotations

import difflib
import math
from numbers import Real
from typing import Any

import torch

from .group_keys import Fail, GroupKey, Problem, boolean, integer, number_in, optional
from .projectors import DEFAULT_PROJECTOR, PROJECTORS, projection_side
from .projectors.base import Projector
from .rules import DEFAULT_UPDATE_RULE, UPDATE_RULES
from .rules.auto_scale import AUTO
from .step.shapes import stepped_shape


def scale_problem(value: Any) -> Problem:
    """Why ``value`` is not a valid ``scale`` (a finite number or ``"auto"``), or None."""
    if value != AUTO and (isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value)):
        return TypeError, f"must be a finite number or {AUTO!r}, got {value!r}"
    return None


# Keys every projected step reads, whatever its projector and update rule. Any other projector key is read only by the
# PROJECTORS and UPDATE_RULES entries that declare it (their ``keys``), and a group may set it only where one does.
STEP_KEYS: dict[str, GroupKey] = {
    "rank": GroupKey(None, integer(1)),   # every projected group sets it
    "update_proj_gap": GroupKey(200, integer(1)),
    "scale": GroupKey(0.25, scale_problem),
    "projector": GroupKey(DEFAULT_PROJECTOR),
    "update_rule": GroupKey(DEFAULT_UPDATE_RULE),
    "transposed": GroupKey(False, boolean),
    "adaptive_gap": GroupKey(False, boolean),
    "max_update_proj_gap": GroupKey(None, optional(integer(1))),   # and >= update_proj_gap
    "gap_overlap_threshold": GroupKey(0.5, number_in(0.0, 1.0, low_open=True, high_open=False)),
    "gap_patience": GroupKey(3, integer(1)),
}


def declared_keys() -> dict[str, GroupKey]:
    """Every key of a projected group: :data:`STEP_KEYS`, then the keys each projector and update rule declares (in
    the tables' order; read at each call, so an entry registered later counts). A key is one thing: two entries that
    declare it must declare the same :class:`~galore_plus.group_keys.GroupKey`."""
    keys = dict(STEP_KEYS)
    for name, entry in [*PROJECTORS.items(), *UPDATE_RULES.items()]:
        for key, declared in entry.keys.items():
            if keys.setdefault(key, declared) != declared:
                raise TypeError(f"table entry {name!r} declares group key {key!r} with another default or check than "
                                "an earlier entry; declare it once and share it")
    return keys


def projected_group_defaults() -> dict[str, Any]:
    """The default of every projected-group key but ``rank`` (as an entry declares it, before a projector's
    ``rule_defaults``)."""
    return {key: declared.default for key, declared in declared_keys().items() if key != "rank"}

# Keys every group may carry besides the optimizer's defaults (lr, betas, eps, weight_decay, foreach) and the
# projector keys: torch's own (``param_names`` of named parameters, ``initial_lr`` set by LR schedulers) and ``name``.
GENERAL_GROUP_KEYS = ("params", "name", "param_names", "initial_lr")
# Keys torch's LR schedulers write into existing groups (OneCycleLR, CyclicLR, SWALR); a checkpoint's
# groups may hold them even when the optimizer it is loaded into has no scheduler yet.
SCHEDULER_GROUP_KEYS = ("max_lr", "min_lr", "base_momentum", "max_momentum", "momentum", "swa_lr")
CONSTRUCTOR_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")


def projector_only_keys() -> tuple[str, ...]:
    """Keys that only a projected group may carry: ``rank`` and every key of :func:`declared_keys`."""
    return tuple(declared_keys())


def valid_group_keys(defaults: dict) -> tuple[str, ...]:
    """Every key a parameter group may have, given the optimizer's ``defaults``."""
    return GENERAL_GROUP_KEYS + tuple(defaults) + projector_only_keys()


def closest_key_hint(key: str, valid: tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid key (difflib), or an empty string."""
    matches = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def group_label(group: dict, index: int) -> str:
    """How errors refer to a group: ``param group 2`` or ``param group 2 ('attn.qk')``."""
    name = group.get("name")
    return f"param group {index}" + (f" ({name!r})" if name is not None else "")


def _fail(group: dict, index: int, key: str, message: str, error: type[Exception] = ValueError) -> None:
    raise error(f"{group_label(group, index)}, key '{key}': {message}")


def _number_problem(key: str, value: Any) -> tuple[type[Exception], str] | None:
    """Why ``value`` is not a valid ``lr``, ``eps`` or ``weight_decay`` (a finite number >= 0), or None."""
    if isinstance(value, torch.Tensor) and key == "lr":
        if value.numel() != 1:
            return ValueError, f"Tensor lr must be 1-element, got one of shape {tuple(value.shape)}"
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, Real):
        hint = ""
        if isinstance(value, str):
            hint = " (a string: YAML reads 1e-3 as text; write 1.0e-3 or convert with float())"
        return TypeError, f"must be a number, got {value!r}{hint}"
    if not math.isfinite(value) or value < 0:
        return ValueError, f"must be a finite number >= 0, got {value!r}"
    return None


def _betas_problem(value: Any) -> tuple[type[Exception], str] | None:
    """Why ``value`` is not a valid ``betas`` (two numbers in [0, 1)), or None."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        return TypeError, f"must be a pair (beta1, beta2), got {value!r}"
    for position, beta in enumerate(value):
        if isinstance(beta, bool) or not isinstance(beta, Real):
            return TypeError, f"beta{position + 1} must be a number, got {beta!r}"
        if not 0.0 <= beta < 1.0:
            return ValueError, f"beta{position + 1} must be in [0, 1), got {beta!r}"
    return None


def check_hyperparameters(values: dict, where: str) -> None:
    """Raise naming ``where`` and the key when ``lr``, ``betas``, ``eps`` or ``weight_decay`` in ``values`` is invalid.

    ``where`` is a group label (``param group 2 ('attn')``) or ``GaLorePlusAdamW argument``.
    """
    for key in CONSTRUCTOR_HYPERPARAMETERS:
        if key not in values:
            continue
        problem = _betas_problem(values[key]) if key == "betas" else _number_problem(key, values[key])
        if problem is not None:
            error, message = problem
            raise error(f"{where}, key '{key}': {message}")
    foreach = values.get("foreach")
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"{where}, key 'foreach': must be None, True or False, got {foreach!r}")
    if foreach and isinstance(values.get("lr"), torch.Tensor):
        raise ValueError(f"{where}, key 'lr': lr as a Tensor is not supported for capturable=False and foreach=True "
                         "(as in torch's AdamW); give a float lr or foreach=None")


# torch.optim.AdamW's flags that GaLorePlusAdamW does not implement, refused by name as constructor arguments and
# group keys (rather than ignored): fused and capturable kernels, differentiable steps, AMSGrad, maximisation.
UNSUPPORTED_TORCH_FLAGS = ("fused", "capturable", "differentiable", "amsgrad", "maximize")


def unsupported_flag_message(key: str, value: Any) -> str:
    """Why a torch AdamW flag of :data:`UNSUPPORTED_TORCH_FLAGS` is refused."""
    return (f"torch.optim.AdamW's {key}={value!r} is not supported by GaLorePlusAdamW (its projected step has no "
            f"{key} variant); leave '{key}' out")


def check_known_keys(group: dict, index: int, defaults: dict) -> None:
    """Refuse a key no part of the optimizer reads (a misspelling would otherwise be ignored silently)."""
    valid = valid_group_keys(defaults)
    for key in group:
        if key in UNSUPPORTED_TORCH_FLAGS:
            _fail(group, index, key, f"is not a parameter-group key of GaLorePlusAdamW: "
                                     f"{unsupported_flag_message(key, group[key])}")
        if key not in valid:
            _fail(group, index, key, f"is not a parameter-group key of GaLorePlusAdamW{closest_key_hint(key, valid)}; "
                                     f"valid keys: {', '.join(valid[1:])}")


def keyword_argument_error(keywords: dict, constructor_args: tuple[str, ...]) -> TypeError:
    """The error for keywords GaLorePlusAdamW's constructor does not take (``rank=16`` belongs in a group)."""
    key = next(iter(keywords))
    if key in projector_only_keys():
        return TypeError(
            f"GaLorePlusAdamW got {key}={keywords[key]!r} as a constructor argument, but {key!r} is a parameter-group "
            "key: projection is chosen per group. Build the groups with galore_plus.make_param_groups(model, "
            f"{key}=...) or pass them yourself, e.g. [{{'params': weights_2d, 'rank': 16}}, {{'params': others}}]"
        )
    if key in UNSUPPORTED_TORCH_FLAGS:
        return TypeError(f"GaLorePlusAdamW got {key}={keywords[key]!r}: {unsupported_flag_message(key, keywords[key])}")
    return TypeError(f"GaLorePlusAdamW got an unexpected keyword argument {key!r}"
                     f"{closest_key_hint(key, constructor_args)}; it takes {', '.join(constructor_args)}")


def key_readers(key: str) -> list[str]:
    """The registry entries that read a projector key, as text: ``["projector 'randomized'", "update rule 'apollo'"]``."""
    return ([f"projector {name!r}" for name, entry in PROJECTORS.items() if key in entry.keys]
            + [f"update rule {name!r}" for name, entry in UPDATE_RULES.items() if key in entry.keys])


def unread_keys(group: dict) -> list[str]:
    """The projector keys of ``group`` that neither every step nor its projector and update rule read (the group's
    ``projector`` and ``update_rule``, or their defaults; an unknown name reads nothing beyond :data:`STEP_KEYS`)."""
    projector = PROJECTORS.get(group.get("projector", DEFAULT_PROJECTOR))
    rule = UPDATE_RULES.get(group.get("update_rule", DEFAULT_UPDATE_RULE))
    read = set(STEP_KEYS) | set(projector.keys if projector else ()) | set(rule.keys if rule else ())
    return [key for key in group if key in projector_only_keys() and key not in read]


def keys_set_apart_from_defaults(group: dict) -> tuple[str, ...]:
    """The projector keys of a new group whose value is not the one the group gets by default (None counts as not
    set), so that a group copied from an optimizer's filled ``param_groups`` is accepted again."""
    defaults = {key: group[key] for key in ("projector", "update_rule") if key in group}
    fill_projected_defaults(defaults)
    return tuple(key for key in projector_only_keys()
                 if key in group and group[key] is not None and (key not in defaults or group[key] != defaults[key]))


def check_keys_are_read(group: dict, index: int, given: tuple[str, ...]) -> None:
    """Refuse a key the user set to something else than its default (``given``) that the group's projector and update
    rule never read: tuning it would change nothing. The error names the key and what would read it."""
    for key, table in (("projector", PROJECTORS), ("update_rule", UPDATE_RULES)):
        if group[key] not in table:
            _fail(group, index, key, f"must be one of {tuple(table)}, got {group[key]!r}")
    for key in unread_keys(group):
        if key in given:
            _fail(group, index, key, f"projector {group['projector']!r} and update rule {group['update_rule']!r} do not "
                                     f"read it, so it would change nothing; it is read by "
                                     f"{', '.join(key_readers(key))}. Remove it or choose one of those")


def fill_projected_defaults(group: dict) -> None:
    """Add the default of every projector key the group does not set (or sets to None, for a key whose values are
    never None): the declared default, or the projector's ``rule_defaults`` for a key its update rule reads."""
    group.setdefault("projector", DEFAULT_PROJECTOR)
    group.setdefault("update_rule", DEFAULT_UPDATE_RULE)
    projector, rule = PROJECTORS.get(group["projector"]), UPDATE_RULES.get(group["update_rule"])
    overrides = projector.rule_defaults if projector is not None and rule is not None else {}
    for key, declared in declared_keys().items():
        if key == "rank" or (key in group and not (declared.unset_when_none and group[key] is None)):
            continue
        group[key] = overrides[key] if key in overrides and key in rule.keys else declared.default


def prepare_group(group: dict, index: int, defaults: dict) -> list[str]:
    """Fill a new group's defaults and validate it; return the warnings to give (a full-rank projection).

    Raises on an unknown key, an invalid hyperparameter or projector key, naming the group and key.
    """
    check_known_keys(group, index, defaults)
    for key, value in defaults.items():
        group.setdefault(key, value)
    check_hyperparameters(group, group_label(group, index))
    if "rank" not in group:
        validate_plain_group(group, index)
        return []
    given = keys_set_apart_from_defaults(group)
    fill_projected_defaults(group)
    check_keys_are_read(group, index, given)
    validate_projected_group(group, index)
    return full_rank_warnings(group, index)


def full_rank_warnings(group: dict, index: int) -> list[str]:
    """A warning when ``rank`` is not below the projected side of some weights: their projection saves nothing."""
    names = group.get("param_names")
    full = []
    for position, param in enumerate(group["params"]):
        *_, m, n = stepped_shape(param, group["transposed"])
        side = projection_side((m, n), group["proj_type"], group["projector"])
        if group["rank"] >= (m if side == "left" else n):
            full.append(f"{names[position] if names else f'parameter {position}'} {tuple(param.shape)}")
    if not full:
        return []
    listed = ", ".join(full[:5]) + (f" and {len(full) - 5} more" if len(full) > 5 else "")
    return [f"{group_label(group, index)}, key 'rank': rank {group['rank']} is not below the projected side of "
            f"{len(full)} weight(s) ({listed}): their low-rank moments are as large as AdamW's and the basis comes "
            "on top, so projecting them saves no memory. Use a smaller rank or put them in a group without 'rank'"]


def format_bytes(count: int) -> str:
    """``12.3 MiB``-style text of a byte count."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


def plain_adamw_warning(param_groups: list[dict]) -> str | None:
    """The warning for an optimizer none of whose groups has ``rank`` (it is then plain AdamW), or None."""
    if any("rank" in group for group in param_groups):
        return None
    matrices = [p for group in param_groups for p in group["params"] if p.dim() == 2 and p.requires_grad]
    if not matrices:
        return None
    moment_bytes = sum(2 * p.numel() * p.element_size() for p in matrices)
    return (f"GaLorePlusAdamW has no parameter group with 'rank', so it is plain AdamW: the moments of its "
            f"{len(matrices)} 2-D weights ({format_bytes(moment_bytes)}) stay full size. Build the groups with "
            "galore_plus.make_param_groups(model, rank=...) or add 'rank' to a group. (transformers.Trainer pops "
            "'params' from an optimizer_cls_and_kwargs dict, so a dict reused for a second Trainer has lost its "
            "groups: build a fresh one per Trainer, or use galore_plus.hf.GaLorePlusTrainer.)")


def validate_plain_group(group: dict, index: int) -> None:
    """A group without ``rank`` must not carry projector keys that would be silently ignored."""
    stray = [key for key in projector_only_keys() if key in group]
    if stray:
        _fail(group, index, stray[0], "is only meaningful in a projected group; add 'rank' to the group or remove the key")


def validate_projected_group(group: dict, index: int) -> None:
    """Check every projector key of a group (defaults already filled, projector and update rule names checked by
    :func:`check_keys_are_read`): each key's own check, the step's and the entries' checks across keys, and every
    parameter's shape."""
    def fail(key: str, message: str, error: type[Exception] = ValueError) -> None:
        _fail(group, index, key, message, error)

    for key, declared in declared_keys().items():
        problem = declared.check(group[key])
        if problem is not None:
            fail(key, problem[1], problem[0])
    if group["max_update_proj_gap"] is not None:
        problem = integer(group["update_proj_gap"])(group["max_update_proj_gap"])
        if problem is not None:
            fail("max_update_proj_gap", problem[1], problem[0])
    projector = PROJECTORS[group["projector"]]
    projector.check_group(group, fail)
    UPDATE_RULES[group["update_rule"]].check_group(group, fail)
    for position, param in enumerate(group["params"]):
        _validate_projected_param(group, index, position, param, projector, fail)


def _validate_stack(group: dict, index: int, where: str) -> None:
    """A stack of matrices (E, m, n) is stepped batched: refuse what is implemented for matrices only."""
    if not PROJECTORS[group["projector"]].stacks:
        stacking = ", ".join(repr(name) for name, entry in PROJECTORS.items() if entry.stacks)
        _fail(group, index, "projector", f"{where} is a stack of matrices (E, m, n); projector {group['projector']!r} "
                                         f"takes matrices only: use one of {stacking} for expert stacks")
    if group["residual_ratio"] > 0:
        _fail(group, index, "residual_ratio", f"{where} is a stack of matrices (E, m, n); the sparse residual is "
                                              "implemented for matrices only: use residual_ratio=0 for expert stacks")
    if group["adaptive_gap"]:
        _fail(group, index, "adaptive_gap", f"{where} is a stack of matrices (E, m, n), whose experts refresh "
                                            "together (batched); a per-weight adaptive gap is implemented for matrices "
                                            "only: use adaptive_gap=False for expert stacks")


def _validate_projected_param(group: dict, index: int, position: int, param: torch.Tensor, projector: Projector,
                              fail: Fail) -> None:
    where = f"parameter {position} of shape {tuple(param.shape)}" + (" (transposed)" if group["transposed"] else "")
    if param.dim() not in (2, 3, 4):
        _fail(group, index, "rank", f"{where} is {param.dim()}-D; a projected weight is a matrix (m, n), a stack of "
                                    "expert matrices (E, m, n) or a convolution kernel (out, in, kh, kw); put it in a "
                                    "group without 'rank'")
    if param.is_complex() or not param.is_floating_point():
        _fail(group, index, "rank", f"{where} has dtype {param.dtype}; only real floating-point weights can be projected", TypeError)
    if param.dim() == 3:
        _validate_stack(group, index, where)
        if param.shape[0] == 0:
            _fail(group, index, "rank", f"{where} is a stack of no expert matrices; put it in a group without 'rank'")
    if param.dim() == 4 and group["transposed"]:
        _fail(group, index, "transposed", f"{where} is a convolution kernel, stepped as the matrix (out, in kh kw); "
                                          "transposed=True is for matrices and stacks of them")
    shape = stepped_shape(param, group["transposed"])
    projector.check_weight(group, shape, where, fail)
    m, n = shape[-2:]
    if group["rank"] > min(m, n):
        _fail(group, index, "rank", f"{group['rank']} exceeds min(m, n) = {min(m, n)} of {where}")
