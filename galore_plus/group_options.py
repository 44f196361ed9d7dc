"""Defaults and validation of the keys of a projected parameter group (one that has ``rank``).

Every error names the parameter group (its index, and its ``name`` key if it has one) and the key
at fault, so a mistake in a 200-group configuration is found at once.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from .apollo_update import SCALE_TYPES
from .basis_quant import BASIS_BITS
from .projectors import HEAD_PROJECTORS, PROJ_TYPES, PROJECTORS
from .residual import RESIDUAL_MODES
from .update_rules import UPDATE_RULES

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
    "update_rule": "galore",
    "scale_type": "channel",
    "basis_bits": 32,
}

PROJECTOR_ONLY_KEYS = tuple(PROJECTED_GROUP_DEFAULTS) + ("rank",)


def group_label(group: dict, index: int) -> str:
    """How errors refer to a group: ``param group 2`` or ``param group 2 ('attn.qk')``."""
    name = group.get("name")
    return f"param group {index}" + (f" ({name!r})" if name is not None else "")


def _fail(group: dict, index: int, key: str, message: str, error: type[Exception] = ValueError) -> None:
    raise error(f"{group_label(group, index)}, key '{key}': {message}")


def _require_int(group: dict, index: int, key: str, minimum: int) -> None:
    value = group[key]
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(group, index, key, f"must be an int, got {value!r}", TypeError)
    if value < minimum:
        _fail(group, index, key, f"must be >= {minimum}, got {value}")


def _require_choice(group: dict, index: int, key: str, choices: tuple[str, ...]) -> None:
    if group[key] not in choices:
        _fail(group, index, key, f"must be one of {choices}, got {group[key]!r}")


def fill_projected_defaults(group: dict) -> None:
    """Add the default of every projector key the group does not set."""
    for key, value in PROJECTED_GROUP_DEFAULTS.items():
        group.setdefault(key, value)


def validate_plain_group(group: dict, index: int) -> None:
    """A group without ``rank`` must not carry projector keys that would be silently ignored."""
    stray = [key for key in PROJECTOR_ONLY_KEYS if key in group]
    if stray:
        _fail(group, index, stray[0], "is only meaningful in a projected group; add 'rank' to the group or remove the key")


def validate_projected_group(group: dict, index: int) -> None:
    """Check every projector key of a group (defaults already filled) and every parameter's shape."""
    _require_int(group, index, "rank", 1)
    _require_int(group, index, "update_proj_gap", 1)
    _require_int(group, index, "oversample", 0)
    _require_int(group, index, "power_iters", 0)
    scale = group["scale"]
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale):
        _fail(group, index, "scale", f"must be a finite number, got {scale!r}", TypeError)
    for key in ("warm_start", "transposed"):
        if not isinstance(group[key], bool):
            _fail(group, index, key, f"must be a bool, got {group[key]!r}", TypeError)
    _require_choice(group, index, "projector", tuple(PROJECTORS))
    _require_choice(group, index, "update_rule", tuple(UPDATE_RULES))
    _require_choice(group, index, "proj_type", PROJ_TYPES)
    _require_choice(group, index, "head_projector", HEAD_PROJECTORS)
    _validate_residual(group, index)
    _validate_apollo(group, index)
    _validate_basis_bits(group, index)
    if group["projector"] == "cross_head":
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
    if group["scale"] < 0:
        _fail(group, index, "scale", f"update_rule 'apollo' multiplies by sqrt(scale); scale must be >= 0, got {group['scale']!r}")
    if group["residual_ratio"] > 0:
        _fail(group, index, "residual_ratio", "the sparse residual is implemented for update_rule 'galore' only; "
                                              "use residual_ratio=0 with update_rule 'apollo'")


def _validate_basis_bits(group: dict, index: int) -> None:
    bits = group["basis_bits"]
    if isinstance(bits, bool) or bits not in BASIS_BITS:
        _fail(group, index, "basis_bits", f"must be one of {BASIS_BITS}, got {bits!r}")
    if bits == 32:
        return
    if not PROJECTORS[group["projector"]].stores_basis:
        _fail(group, index, "basis_bits", f"projector {group['projector']!r} stores no basis (it is regenerated every "
                                          "step); use basis_bits=32")
    try:
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        _fail(group, index, "basis_bits", "4-bit bases need bitsandbytes: pip install bitsandbytes", ImportError)


def _validate_heads(group: dict, index: int) -> None:
    num_heads, head_dim = group["num_heads"], group["head_dim"]
    if num_heads is None and head_dim is None:
        _fail(group, index, "num_heads", "projector 'cross_head' needs 'num_heads' (or 'head_dim') to split rows into heads")
    if num_heads is not None and head_dim is not None:
        _fail(group, index, "head_dim", "give either 'num_heads' or 'head_dim', not both")
    key = "num_heads" if num_heads is not None else "head_dim"
    _require_int(group, index, key, 1)


def _validate_projected_param(group: dict, index: int, position: int, param: torch.Tensor) -> None:
    where = f"parameter {position} of shape {tuple(param.shape)}" + (" (transposed)" if group["transposed"] else "")
    if param.dim() != 2:
        _fail(group, index, "rank", f"{where} is not 2-D; put it in a group without 'rank'")
    if param.is_complex() or not param.is_floating_point():
        _fail(group, index, "rank", f"{where} has dtype {param.dtype}; only real floating-point weights can be projected", TypeError)
    m, n = reversed(param.shape) if group["transposed"] else param.shape
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
    elif m % group["num_heads"]:
        _fail(group, index, "num_heads", f"{group['num_heads']} does not divide the {m} rows of {where}")
