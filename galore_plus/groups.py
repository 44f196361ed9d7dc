"""``make_param_groups``: parameter groups for a real model, ready for GaLorePlusAdamW."""

from __future__ import annotations

import re
import warnings
from typing import Any, Iterable

from torch import nn

QUERY_NAMES = ("q_proj", "query", "wq", "q_lin")
KEY_NAMES = ("k_proj", "key", "wk", "k_lin")
OUTPUT_HEAD_NAMES = ("lm_head", "output", "embed_out", "classifier", "score")


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def module_matches(name: str, target_modules: str | Iterable[str]) -> bool:
    """Whether a module name is targeted: ``"all-linear"``, a regex string, or a list of name suffixes."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return _leaf(name) not in OUTPUT_HEAD_NAMES
        return re.fullmatch(target_modules, name) is not None or re.search(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _config_value(model: nn.Module, *keys: str) -> int | None:
    config = getattr(model, "config", None)
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _head_count(model: nn.Module, name: str, num_heads: int | None, num_kv_heads: int | None) -> int:
    """Heads of a query or key projection, from the arguments or ``model.config``."""
    heads = num_heads or _config_value(model, "num_attention_heads", "n_head", "num_heads")
    if heads is None:
        raise ValueError(
            f"cannot find the number of attention heads for '{name}': model.config has no num_attention_heads; "
            "pass make_param_groups(..., num_heads=H) (and num_kv_heads=K for grouped-query attention)"
        )
    if _leaf(name) in KEY_NAMES:
        return num_kv_heads or _config_value(model, "num_key_value_heads") or heads
    return heads


def make_param_groups(
    model: nn.Module,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    target_modules: str | Iterable[str] = "all-linear",
    residual_ratio: float = 0.0,
    projector: str = "randomized",
    cross_head: bool = True,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    include_lm_head: bool = False,
    verbose: bool = False,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into GaLorePlusAdamW groups.

    * query/key projections (``q_proj``/``k_proj`` and similar names) -> ``cross_head`` groups,
      one per head count (grouped-query attention gives k fewer heads), with ``residual_ratio``;
    * other matched 2-D ``nn.Linear`` weights -> one ``projector`` group;
    * everything else (embeddings, norms, biases, the output head unless ``include_lm_head``, and
      matched weights smaller than ``rank``) -> a plain AdamW group.

    ``group_options`` (e.g. ``oversample=16``) are added to every projected group. With
    ``verbose`` a summary of what went where is printed.
    """
    projected_options = dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale, **group_options)
    groups: dict[str, dict[str, Any]] = {}
    placed: dict[str, str] = {}
    too_small: list[str] = []

    def place(group_name: str, param: nn.Parameter, param_name: str, options: dict[str, Any]) -> None:
        groups.setdefault(group_name, {"params": [], "name": group_name, **options})["params"].append(param)
        placed[param_name] = group_name

    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not module.weight.requires_grad:
            continue
        is_head = _leaf(module_name) in OUTPUT_HEAD_NAMES
        if not (module_matches(module_name, target_modules) or (include_lm_head and is_head)):
            continue
        weight = module.weight
        weight_name = f"{module_name}.weight"
        if rank > min(weight.shape):
            too_small.append(weight_name)
            continue
        if cross_head and _leaf(module_name) in QUERY_NAMES + KEY_NAMES:
            heads = _head_count(model, module_name, num_heads, num_kv_heads)
            options = dict(projected_options, projector="cross_head", num_heads=heads)
            if residual_ratio > 0:
                options["residual_ratio"] = residual_ratio
            place(f"cross_head_{heads}_heads", weight, weight_name, options)
        else:
            place(projector, weight, weight_name, dict(projected_options, projector=projector))

    for param_name, param in model.named_parameters():
        if param.requires_grad and param_name not in placed:
            place("adamw", param, param_name, {})

    if too_small:
        warnings.warn(f"{len(too_small)} matched weight(s) have a side smaller than rank={rank} and stay in the "
                      f"plain AdamW group: {too_small[:5]}{' ...' if len(too_small) > 5 else ''}", stacklevel=2)
    if verbose:
        print(describe_placement(placed))
    return list(groups.values())


def describe_placement(placed: dict[str, str]) -> str:
    """A short text table: each group with its parameter count and a few parameter names."""
    by_group: dict[str, list[str]] = {}
    for param_name, group_name in placed.items():
        by_group.setdefault(group_name, []).append(param_name)
    lines = []
    for group_name, names in by_group.items():
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        lines.append(f"{group_name:>24}: {len(names):4d} tensors ({shown})")
    return "\n".join(lines)
