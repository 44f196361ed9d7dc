"""``make_param_groups``: parameter groups for a real model, ready for GaLorePlusAdamW.

Where each weight goes (a *plan*, see :func:`plan_param_groups`):

* separate query / key projections (``q_proj``, ``k_proj``, BERT's ``query``, ``key`` and similar
  names) -> ``cross_head`` groups, one per head count (grouped-query attention gives k fewer heads);
* fused query-key-value projections stored like ``nn.Linear`` (``qkv_proj``, ``query_key_value``,
  ``Wqkv``) -> a ``cross_head`` group whose heads are the q, k and v heads together: every row block
  of ``head_dim`` rows is one head, and one input-side basis serves all of them;
* the same projections stored by a transformers ``Conv1D`` (GPT-2's fused ``c_attn`` and
  cross-attention ``q_attn``) -> ``cross_head`` groups with ``transposed=True``, see below;
* every other targeted ``nn.Linear`` or ``Conv1D`` weight -> one ``projector`` group;
* everything else -> a plain AdamW group.

Conv1D (GPT-2, GPT) stores its weight transposed: shape (in, out), forward ``x @ W``, so its heads
are column blocks and its input side is the row side. ``cross_head`` needs the ``nn.Linear``
layout (heads are row blocks, the shared basis is on the columns), so these groups set
``transposed=True``: the optimizer then steps the weight's transpose, a view, exactly as it would
step the equivalent ``nn.Linear`` weight. GPT-2's ``c_attn`` (n_embd, 3 n_embd) becomes 3 n_head
heads: the q, k and v heads share one input-side basis. The ``svd`` and ``randomized``
projectors do not care about the layout (``proj_type="std"`` projects the smaller side either
way), so other Conv1D weights need no flag.

A targeted weight that cannot be projected stays in AdamW and is listed, with the reason, in
``ParamGroupPlan.unplaced`` (and in a warning from ``make_param_groups``): a side smaller than
``rank``, a tensor tied to another parameter (GPT-2's ``lm_head`` and BERT's MLM ``decoder`` share
the word embeddings; they are output heads, targeted only with ``include_lm_head``), or a head
count that does not divide its outputs.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

from torch import nn

QUERY_NAMES = ("q_proj", "query", "wq", "q_lin", "q_attn")
KEY_NAMES = ("k_proj", "key", "wk", "k_lin")
FUSED_QKV_NAMES = ("qkv_proj", "query_key_value", "Wqkv", "qkv", "c_attn")
OUTPUT_HEAD_NAMES = ("lm_head", "output", "embed_out", "classifier", "score", "decoder", "vocab_projector")


@dataclass
class ParamGroupPlan:
    """The groups for GaLorePlusAdamW and, by parameter name, where each parameter went.

    ``placement`` maps every trainable parameter's name to its group name; ``unplaced`` maps the
    name of each targeted weight that could not be projected to the reason.
    """

    groups: list[dict[str, Any]]
    placement: dict[str, str] = field(default_factory=dict)
    unplaced: dict[str, str] = field(default_factory=dict)


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (weight stored (in, out)), without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(getattr(module, "weight", None), nn.Parameter)


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
    """Heads (row blocks) of a query, key or fused query-key-value projection, from the arguments or ``model.config``."""
    heads = num_heads or _config_value(model, "num_attention_heads", "n_head", "num_heads")
    if heads is None:
        raise ValueError(
            f"cannot find the number of attention heads for '{name}': model.config has no num_attention_heads; "
            "pass make_param_groups(..., num_heads=H) (and num_kv_heads=K for grouped-query attention), "
            "or cross_head=False"
        )
    kv_heads = num_kv_heads or _config_value(model, "num_key_value_heads") or heads
    if _leaf(name) in KEY_NAMES:
        return kv_heads
    if _leaf(name) in FUSED_QKV_NAMES:
        return heads + 2 * kv_heads
    return heads


def _projectable_weight(module: nn.Module) -> nn.Parameter | None:
    """The 2-D weight of an ``nn.Linear`` or transformers ``Conv1D``; None for other modules."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return module.weight
    return None


def plan_param_groups(
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
    **group_options: Any,
) -> ParamGroupPlan:
    """The plan behind :func:`make_param_groups` (same arguments), with where each parameter went."""
    projected_options = dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale, **group_options)
    canonical_names = {id(param): name for name, param in model.named_parameters()}
    plan = ParamGroupPlan(groups=[])
    groups: dict[str, dict[str, Any]] = {}

    def place(group_name: str, param: nn.Parameter, param_name: str, options: dict[str, Any]) -> None:
        groups.setdefault(group_name, {"params": [], "name": group_name, **options})["params"].append(param)
        plan.placement[param_name] = group_name

    for module_name, module in model.named_modules():
        weight = _projectable_weight(module)
        if weight is None or not weight.requires_grad:
            continue
        is_head = _leaf(module_name) in OUTPUT_HEAD_NAMES
        if not (module_matches(module_name, target_modules) or (include_lm_head and is_head)):
            continue
        weight_name = f"{module_name}.weight"
        canonical = canonical_names[id(weight)]
        if canonical != weight_name:
            if canonical not in plan.placement:
                plan.unplaced[weight_name] = f"tied to {canonical} (the same tensor); tied weights stay in AdamW"
            continue
        if rank > min(weight.shape):
            plan.unplaced[weight_name] = f"shape {tuple(weight.shape)} has a side smaller than rank={rank}"
            continue
        if cross_head and _leaf(module_name) in QUERY_NAMES + KEY_NAMES + FUSED_QKV_NAMES:
            heads = _head_count(model, module_name, num_heads, num_kv_heads)
            transposed = is_conv1d(module)
            outputs = weight.shape[1] if transposed else weight.shape[0]
            if outputs % heads:
                plan.unplaced[weight_name] = f"{heads} heads do not divide its {outputs} outputs; pass num_heads"
                continue
            options = dict(projected_options, projector="cross_head", num_heads=heads)
            if transposed:
                options["transposed"] = True
            if residual_ratio > 0:
                options["residual_ratio"] = residual_ratio
            place(f"cross_head_{heads}_heads" + ("_transposed" if transposed else ""), weight, weight_name, options)
        else:
            place(projector, weight, weight_name, dict(projected_options, projector=projector))

    for param_name, param in model.named_parameters():
        if param.requires_grad and param_name not in plan.placement:
            place("adamw", param, param_name, {})
    plan.groups = list(groups.values())
    return plan


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
    """Split a model's trainable parameters into GaLorePlusAdamW groups (see the module docstring).

    * query/key projections -> ``cross_head`` groups with ``residual_ratio``, one per head count;
    * fused q/k/v projections -> ``cross_head`` with H + 2 K heads (``transposed=True`` for Conv1D);
    * other matched 2-D ``nn.Linear`` and transformers ``Conv1D`` weights -> one ``projector`` group;
    * everything else (embeddings, norms, biases, the output head unless ``include_lm_head``, tied
      weights and matched weights smaller than ``rank``) -> a plain AdamW group.

    ``group_options`` (e.g. ``oversample=16``) are added to every projected group. Targeted weights
    that could not be projected are named in a warning; with ``verbose`` a summary of what went
    where is printed.
    """
    plan = plan_param_groups(
        model, rank=rank, update_proj_gap=update_proj_gap, scale=scale, target_modules=target_modules,
        residual_ratio=residual_ratio, projector=projector, cross_head=cross_head, num_heads=num_heads,
        num_kv_heads=num_kv_heads, include_lm_head=include_lm_head, **group_options,
    )
    if plan.unplaced:
        listed = "; ".join(f"{name}: {reason}" for name, reason in list(plan.unplaced.items())[:5])
        more = f" (and {len(plan.unplaced) - 5} more)" if len(plan.unplaced) > 5 else ""
        warnings.warn(f"{len(plan.unplaced)} targeted weight(s) could not be projected and stay in the plain AdamW "
                      f"group: {listed}{more}", stacklevel=2)
    if verbose:
        print(describe_placement(plan.placement))
    return plan.groups


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
