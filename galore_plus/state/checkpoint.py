"""What ``GaLorePlusAdamW.load_state_dict`` accepts: a checkpoint of the same groups, ranks, shapes and bits.

``torch.optim.Optimizer.load_state_dict`` replaces every group by the saved one and takes the saved
state as it is, so a foreign or mismatched checkpoint loads "successfully" and fails (or silently
changes the run) later: galore_torch's ``GaLoreAdamW`` state fails at the first step, a rank-16
checkpoint turns rank-8 groups into rank-16 ones. :func:`checked_state_dict` compares the checkpoint
with the optimizer it is loaded into before anything is changed, and raises a ``ValueError`` that
names the group, the parameter and the key at fault:

* same number of groups and of parameters per group; no group key GaLorePlusAdamW does not know
  (galore_torch's ``correct_bias``) other than torch LR schedulers' keys;
* projected and plain groups in the same places, and every projector key (``rank``, ``projector``,
  ``num_heads``, ...) equal: a checkpoint never changes how a group is projected. Hyperparameters
  (``lr``, ``betas``, ``eps``, ``weight_decay``) are restored from the checkpoint, as in torch;
* state values are tensors or plain numbers (no projector objects); the basis, the moments and the
  residual have the shapes this optimizer's rank and weights imply; moments have the bit width of this
  optimizer (``optim_bits``). A plain tensor's ``step`` saved as a number (older torch) loads, as in torch.

Keys a checkpoint's groups lack (saved before a key existed) are refilled from the optimizer's group.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..group_options import SCHEDULER_GROUP_KEYS, closest_key_hint, group_label, projector_only_keys, valid_group_keys
from ..projectors import projection_side
from ..step.shapes import stepped_shape
from . import moments_8bit
from .adamw_8bit import uses_8bit_adamw
from .projected import projected_state

FOREIGN_HINT = ("this is not a GaLorePlusAdamW checkpoint (galore_torch.GaLoreAdamW stores projector objects and a "
                "'correct_bias' key); start this optimizer fresh instead of loading it")


def checked_state_dict(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with its groups' missing keys refilled, after checking it fits ``optimizer``.

    Raises ``ValueError`` (naming group, parameter and key) when it does not; nothing is changed then.
    """
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError("load_state_dict: expected an optimizer state dict with 'state' and 'param_groups', got "
                         f"{type(state_dict).__name__}" + (f" with keys {sorted(state_dict)[:5]}"
                                                           if isinstance(state_dict, dict) else ""))
    saved_groups, groups = state_dict["param_groups"], optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(f"load_state_dict: the checkpoint has {len(saved_groups)} parameter groups, this optimizer "
                         f"{len(groups)}; build the optimizer with the same groups (the same make_param_groups "
                         "arguments) as the run that saved it")
    refilled = []
    for index, (saved, group) in enumerate(zip(saved_groups, groups)):
        refilled.append(_checked_group(saved, group, index, optimizer.defaults))
        for position, (saved_id, param) in enumerate(zip(saved["params"], group["params"])):
            saved_state = state_dict["state"].get(saved_id)
            if saved_state is not None:
                where = f"{group_label(group, index)}, parameter {position} of shape {tuple(param.shape)}"
                _check_param_state(saved_state, param, group, where, optimizer.optim_bits)
    return {**state_dict, "param_groups": refilled}


def _checked_group(saved: dict[str, Any], group: dict[str, Any], index: int, defaults: dict) -> dict[str, Any]:
    """A copy of the saved group with the optimizer group's keys it lacks; raises on a mismatch."""
    label = group_label(group, index)
    if len(saved["params"]) != len(group["params"]):
        raise ValueError(f"load_state_dict: {label} has {len(group['params'])} parameters, the checkpoint's group "
                         f"{len(saved['params'])}; build the optimizer with the same groups as the run that saved it")
    valid = valid_group_keys(defaults) + SCHEDULER_GROUP_KEYS
    for key in saved:
        if key not in valid and key not in group:
            raise ValueError(f"load_state_dict: {label}, key '{key}': the checkpoint's group has a key GaLorePlusAdamW "
                             f"does not use{closest_key_hint(key, valid)}; {FOREIGN_HINT}")
    if ("rank" in saved) != ("rank" in group):
        saved_kind = f"projects it (rank {saved['rank']})" if "rank" in saved else "keeps it in plain AdamW"
        kind = "projects it" if "rank" in group else "keeps it in plain AdamW"
        raise ValueError(f"load_state_dict: {label}: the checkpoint {saved_kind} but this optimizer {kind}; build the "
                         "optimizer with the groups of the run that saved the checkpoint")
    refilled = {**group, **saved}
    for key in projector_only_keys():
        if key in group and refilled[key] != group[key]:
            raise ValueError(f"load_state_dict: {label}, key '{key}': the checkpoint was saved with {key}="
                             f"{refilled[key]!r}, this optimizer's group has {key}={group[key]!r}. A checkpoint cannot "
                             f"change how a group is projected: build the optimizer with {key}={refilled[key]!r} to "
                             "resume, or start the optimizer fresh")
    return refilled


def _check_param_state(state: dict[str, Any], param: Tensor, group: dict[str, Any], where: str, optim_bits: int) -> None:
    """Raise when one parameter's saved state is foreign, has the wrong shapes, or the wrong bit width."""
    for key, value in state.items():
        if not is_plain_value(value):
            raise ValueError(f"load_state_dict: {where}, state key '{key}': holds a {type(value).__name__} object; "
                             f"{FOREIGN_HINT}")
    quantized = optim_bits == 8 and ("rank" in group or uses_8bit_adamw(param))
    moments_8bit.check_loaded_moments(state, quantized, f"load_state_dict: {where}")
    if "rank" in group:
        expected = projected_state_shapes(param, group)
    else:
        expected = {key: tuple(param.shape) for key in ("exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_sq_codes")}
    for key, shape in expected.items():
        value = state.get(key)
        if isinstance(value, Tensor) and tuple(value.shape) != shape:
            raise ValueError(f"load_state_dict: {where}, state key '{key}': the checkpoint's tensor has shape "
                             f"{tuple(value.shape)}, this optimizer expects {shape}"
                             + (f" (rank {group['rank']})" if "rank" in group else "")
                             + "; the checkpoint was saved for other weights or another rank")
    residual_col = state.get("residual_col")
    if isinstance(residual_col, Tensor):
        for key in ("residual_exp_avg", "residual_exp_avg_sq"):
            if isinstance(state.get(key), Tensor) and state[key].shape != residual_col.shape:
                raise ValueError(f"load_state_dict: {where}, state key '{key}': shape {tuple(state[key].shape)} differs "
                                 f"from the index set's {tuple(residual_col.shape)}")


def is_plain_value(value: Any) -> bool:
    """Whether ``value`` is what GaLorePlusAdamW's state may hold: tensors and plain Python values (and
    lists, tuples or dicts of them), never an object of some optimizer's class."""
    if isinstance(value, (list, tuple)):
        return all(is_plain_value(item) for item in value)
    if isinstance(value, dict):
        return all(is_plain_value(item) for item in value.values())
    return value is None or isinstance(value, (Tensor, int, float, bool, str))


def projected_state_shapes(param: Tensor, group: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors a projected weight's state may hold (:func:`~galore_plus.state.projected.projected_state`:
    basis or its 4-bit codes, moments or their 8-bit codes, the residual, the projector's and update rule's own)."""
    shape = stepped_shape(param, group["transposed"])
    side = projection_side(shape, group["proj_type"], group["projector"])
    return {key: tensor.shape(shape, group, side) for key, tensor in projected_state(group).items()}
