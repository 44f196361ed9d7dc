"""Defaults and validation of parameter-group keys, done when a group is added to the optimizer.

* every key must be one the optimizer reads (a misspelling gets the closest valid key, by difflib);
  the valid keys derive from :data:`PROJECTED_GROUP_DEFAULTS`;
* a projected group may set only keys that every step reads (:data:`STEP_KEYS`) or that its
  projector or update rule declares (``keys`` of its ``PROJECTORS`` / ``UPDATE_RULES`` entry):
  ``oversample`` in an ``svd`` group raises, naming the projectors that read it;
* ``lr``, ``betas``, ``eps``, ``weight_decay`` must be valid numbers, in every group;
* a projected group (one that has ``rank``) gets its defaults and every projector key checked; a
  ``rank`` not below the side a weight projects is warned about (it saves no memory).

Every error names the parameter group (its index, and its ``name`` key if it has one) and the key
at fault, so a mistake in a 200-group configuration is found at once.
"""

from __future__ import annotations

import difflib
import math
from numbers import Real
from typing import Any

import torch

from .projectors import PROJ_TYPES, PROJECTORS, projection_side
from .projectors.cross_head import HEAD_PROJECTORS
from .rules import UPDATE_RULES
from .rules.apollo import SCALE_TYPES
from .rules.auto_scale import AUTO
from .sparse_residual.values import RESIDUAL_MODES
from .state.basis_4bit import BASIS_BITS

PROJECTED_GROUP_DEFAULTS: dict = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "projector": "randomized",
    "num_heads": None,
    "head_dim": None,
    "head_projector": "svd",
    "oversample": 8,
    "power_iters": 2,
    "warm_start": True,
    "transposed": False,
    "residual_ratio": 0.0,
    "residual_warmup": 10,
    "residual_mode": "exact",
    "cross_head_heads": None,
    "moment_transfer": False,
    "full_rank_residual": None,
    "norm_growth_limit": 1.01,
    "adaptive_gap": False,
    "max_update_proj_gap": None,
    "gap_overlap_threshold": 0.5,
    "gap_patience": 3,
    "update_rule": "galore",
    "scale_type": "channel",
    "basis_bits": 32,
}

# Keys every group may carry besides the optimizer's defaults (lr, betas, eps, weight_decay, foreach) and the
# projector keys: torch's own (``param_names`` of named parameters, ``initial_lr`` set by LR schedulers) and ``name``.
GENERAL_GROUP_KEYS = ("params", "name", "param_names", "initial_lr")
# Keys torch's LR schedulers write into existing groups (OneCycleLR, CyclicLR, SWALR); a checkpoint's
# groups may hold them even when the optimizer it is loaded into has no scheduler yet.
SCHEDULER_GROUP_KEYS = ("max_lr", "min_lr", "base_momentum", "max_momentum", "momentum", "swa_lr")
CONSTRUCTOR_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")


def projector_only_keys() -> tuple[str, ...]:
    """Keys that only a projected group may carry: ``rank`` and every key of :data:`PROJECTED_GROUP_DEFAULTS`."""
    return ("rank",) + tuple(PROJECTED_GROUP_DEFAULTS)


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


def _require_int(group: dict, index: int, key: str, minimum: int) -> None:
    value = group[key]
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(group, index, key, f"must be an int, got {value!r}", TypeError)
    if value < minimum:
        _fail(group, index, key, f"must be >= {minimum}, got {value}")


def _require_choice(group: dict, index: int, key: str, choices: tuple[str, ...]) -> None:
    if group[key] not in choices:
        _fail(group, index, key, f"must be one of {choices}, got {group[key]!r}")


def default_full_rank_residual(group: dict) -> bool:
    """``full_rank_residual`` of a group that does not set it: its projector's default (``Projector.full_rank_residual``)
    where its update rule reads the key (GaLore's rule), else False."""
    projector, rule = PROJECTORS.get(group["projector"]), UPDATE_RULES.get(group["update_rule"])
    return bool(projector and rule and projector.full_rank_residual and "full_rank_residual" in rule.keys)


# Keys every projected step reads, whatever its projector and update rule. Any other projector key is read only by the
# PROJECTORS and UPDATE_RULES entries that declare it (their ``keys``), and a group may set it only where one does.
STEP_KEYS = ("rank", "update_proj_gap", "scale", "projector", "update_rule", "transposed", "adaptive_gap",
             "max_update_proj_gap", "gap_overlap_threshold", "gap_patience")


def key_readers(key: str) -> list[str]:
    """The registry entries that read a projector key, as text: ``["projector 'randomized'", "update rule 'apollo'"]``."""
    return ([f"projector {name!r}" for name, entry in PROJECTORS.items() if key in entry.keys]
            + [f"update rule {name!r}" for name, entry in UPDATE_RULES.items() if key in entry.keys])


def unread_keys(group: dict) -> list[str]:
    """The projector keys of ``group`` that neither every step nor its projector and update rule read (the group's
    ``projector`` and ``update_rule``, or their defaults; an unknown name reads nothing beyond :data:`STEP_KEYS`)."""
    projector = PROJECTORS.get(group.get("projector", PROJECTED_GROUP_DEFAULTS["projector"]))
    rule = UPDATE_RULES.get(group.get("update_rule", PROJECTED_GROUP_DEFAULTS["update_rule"]))
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
    _require_choice(group, index, "projector", tuple(PROJECTORS))
    _require_choice(group, index, "update_rule", tuple(UPDATE_RULES))
    for key in unread_keys(group):
        if key in given:
            _fail(group, index, key, f"projector {group['projector']!r} and update rule {group['update_rule']!r} do not "
                                     f"read it, so it would change nothing; it is read by "
                                     f"{', '.join(key_readers(key))}. Remove it or choose one of those")


def fill_projected_defaults(group: dict) -> None:
    """Add the default of every projector key the group does not set (``full_rank_residual`` by projector)."""
    for key, value in PROJECTED_GROUP_DEFAULTS.items():
        group.setdefault(key, value)
    if group["full_rank_residual"] is None:
        group["full_rank_residual"] = default_full_rank_residual(group)


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


def stepped_shape(param: torch.Tensor, group: dict) -> tuple[int, ...]:
    """The shape the optimizer steps: (m, n) of a matrix (its transpose for a ``transposed`` group, GPT-2 Conv1D),
    (E, m, n) of a stack of E matrices (each transposed for ``transposed``), and (out, in kh kw) of a
    convolution kernel (out, in, kh, kw)."""
    if param.dim() == 4:
        return param.shape[0], math.prod(param.shape[1:])
    *batch, rows, columns = param.shape
    return (*batch, columns, rows) if group.get("transposed") else (*batch, rows, columns)


def full_rank_warnings(group: dict, index: int) -> list[str]:
    """A warning when ``rank`` is not below the projected side of some weights: their projection saves nothing."""
    names = group.get("param_names")
    full = []
    for position, param in enumerate(group["params"]):
        *_, m, n = stepped_shape(param, group)
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
    :func:`check_keys_are_read`) and every parameter's shape."""
    _require_int(group, index, "rank", 1)
    _require_int(group, index, "update_proj_gap", 1)
    _require_int(group, index, "oversample", 0)
    _require_int(group, index, "power_iters", 0)
    scale = group["scale"]
    if scale != AUTO and (isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale)):
        _fail(group, index, "scale", f"must be a finite number or {AUTO!r}, got {scale!r}", TypeError)
    for key in ("warm_start", "transposed", "moment_transfer", "full_rank_residual", "adaptive_gap"):
        if not isinstance(group[key], bool):
            _fail(group, index, key, f"must be a bool, got {group[key]!r}", TypeError)
    _require_choice(group, index, "proj_type", PROJ_TYPES)
    _require_choice(group, index, "head_projector", HEAD_PROJECTORS)
    _validate_residual(group, index)
    _validate_levers(group, index)
    _validate_apollo(group, index)
    _validate_muon(group, index)
    _validate_basis_bits(group, index)
    if "num_heads" in PROJECTORS[group["projector"]].keys:
        _validate_heads(group, index)
    for position, param in enumerate(group["params"]):
        _validate_projected_param(group, index, position, param)


def _validate_residual(group: dict, index: int) -> None:
    ratio = group["residual_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, Real):
        _fail(group, index, "residual_ratio", f"must be a number, got {ratio!r}", TypeError)
    if not 0.0 <= ratio < 1.0:
        _fail(group, index, "residual_ratio", f"must be in [0, 1), got {ratio!r}")
    _require_int(group, index, "residual_warmup", 0)
    _require_choice(group, index, "residual_mode", RESIDUAL_MODES)


def _validate_apollo(group: dict, index: int) -> None:
    _require_choice(group, index, "scale_type", SCALE_TYPES)
    if group["update_rule"] != "apollo":
        return
    if group["scale"] == AUTO:
        _fail(group, index, "scale", f"{AUTO!r} is for update_rule 'galore'; update_rule 'apollo' needs a number "
                                     "(APOLLO: 1, APOLLO-Mini: 128)")
    if group["scale"] < 0:
        _fail(group, index, "scale", f"update_rule 'apollo' multiplies by sqrt(scale); scale must be >= 0, got {group['scale']!r}")


def _validate_muon(group: dict, index: int) -> None:
    if group["update_rule"] != "muon":
        return
    if isinstance(group["scale"], bool) or not isinstance(group["scale"], Real) or group["scale"] < 0:
        _fail(group, index, "scale", f"update_rule 'muon' multiplies its RMS-matched step by scale, a number >= 0 "
                                     f"(1 matches AdamW's update RMS), got {group['scale']!r}")


def _validate_basis_bits(group: dict, index: int) -> None:
    bits = group["basis_bits"]
    if isinstance(bits, bool) or bits not in BASIS_BITS:
        _fail(group, index, "basis_bits", f"must be one of {BASIS_BITS}, got {bits!r}")
    if bits == 32:
        return
    try:
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        _fail(group, index, "basis_bits", "4-bit bases need bitsandbytes: pip install bitsandbytes", ImportError)


def _require_real(group: dict, index: int, key: str) -> float:
    value = group[key]
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        _fail(group, index, key, f"must be a finite number, got {value!r}", TypeError)
    return value


def _validate_levers(group: dict, index: int) -> None:
    if group["norm_growth_limit"] is not None and _require_real(group, index, "norm_growth_limit") < 1.0:
        _fail(group, index, "norm_growth_limit", f"must be >= 1 (or None to disable the limiter), got {group['norm_growth_limit']!r}")
    if group["max_update_proj_gap"] is not None:
        _require_int(group, index, "max_update_proj_gap", group["update_proj_gap"])
    if not 0.0 < _require_real(group, index, "gap_overlap_threshold") <= 1.0:
        _fail(group, index, "gap_overlap_threshold", f"must be in (0, 1], got {group['gap_overlap_threshold']!r}")
    _require_int(group, index, "gap_patience", 1)
    if group["cross_head_heads"] is not None:
        _require_int(group, index, "cross_head_heads", 1)


def _validate_heads(group: dict, index: int) -> None:
    num_heads, head_dim = group["num_heads"], group["head_dim"]
    if num_heads is None and head_dim is None:
        _fail(group, index, "num_heads", f"projector {group['projector']!r} needs 'num_heads' (or 'head_dim') to split rows "
                                         "into heads")
    if num_heads is not None and head_dim is not None:
        _fail(group, index, "head_dim", "give either 'num_heads' or 'head_dim', not both")
    key = "num_heads" if num_heads is not None else "head_dim"
    _require_int(group, index, key, 1)


def _validate_stack(group: dict, index: int, where: str) -> None:
    """A stack of matrices (E, m, n) is stepped batched: refuse what is implemented for matrices only."""
    if not PROJECTORS[group["projector"]].stacks:
        _fail(group, index, "projector", f"{where} is a stack of matrices (E, m, n); projector {group['projector']!r} "
                                         "takes matrices only: use 'svd', 'randomized' or 'random' for expert stacks")
    if group["residual_ratio"] > 0:
        _fail(group, index, "residual_ratio", f"{where} is a stack of matrices (E, m, n); the sparse residual is "
                                              "implemented for matrices only: use residual_ratio=0 for expert stacks")
    if group["adaptive_gap"]:
        _fail(group, index, "adaptive_gap", f"{where} is a stack of matrices (E, m, n), whose experts refresh "
                                            "together (batched); a per-weight adaptive gap is implemented for matrices "
                                            "only: use adaptive_gap=False for expert stacks")


def _validate_projected_param(group: dict, index: int, position: int, param: torch.Tensor) -> None:
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
    *_, m, n = stepped_shape(param, group)
    rank = group["rank"]
    if group["projector"] != "cross_head":
        if rank > min(m, n):
            _fail(group, index, "rank", f"{rank} exceeds min(m, n) = {min(m, n)} of {where}")
        return
    if rank > n or rank > m:
        _fail(group, index, "rank", f"{rank} exceeds the input size n = {n} (or rows m = {m}) of {where}")
    if group["head_dim"] is not None:
        if m % group["head_dim"]:
            _fail(group, index, "head_dim", f"{group['head_dim']} does not divide the {m} rows of {where}")
        num_heads, head_dim = m // group["head_dim"], group["head_dim"]
    elif m % group["num_heads"]:
        _fail(group, index, "num_heads", f"{group['num_heads']} does not divide the {m} rows of {where}")
    else:
        num_heads, head_dim = group["num_heads"], m // group["num_heads"]
    heads = group["cross_head_heads"]
    if heads is not None and min(heads, num_heads) * head_dim < rank:
        _fail(group, index, "cross_head_heads", f"{heads} heads of {head_dim} rows of {where} give fewer rows than "
                                                f"rank = {rank}")
