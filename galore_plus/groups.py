"""``make_param_groups``: parameter groups for a real model, ready for GaLorePlusAdamW.

Where each weight goes (a *plan*, see :func:`plan_param_groups`):

* separate query / key projections (``q_proj``, ``k_proj``, BERT's ``query``, ``key`` and similar
  names) -> ``cross_head`` groups, one per head count (grouped-query attention gives k fewer heads);
* fused query-key-value projections stored like ``nn.Linear`` (``qkv_proj``, ``query_key_value``,
  ``Wqkv``) -> a ``cross_head`` group whose heads are the q, k and v heads together: every row block
  of ``head_dim`` rows is one head, and one input-side basis serves all of them;
* the same projections stored by a transformers ``Conv1D`` (GPT-2's fused ``c_attn`` and
  cross-attention ``q_attn``) -> ``cross_head`` groups with ``transposed=True``, see below;
* every other targeted ``nn.Linear`` or ``Conv1D`` weight, and ``nn.Conv2d`` kernel (stepped as the matrix
  (out, in kh kw)) -> one ``projector`` group;
* the expert stacks of a mixture-of-experts layer (transformers 5 stores a layer's experts fused, as
  3-D parameters (E, m, n) of an ``...Experts`` module: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3,
  GPT-OSS) -> a ``{projector}_experts`` group, each expert its own matrix (``galore_plus.step.stacks``);
* everything else -> a plain AdamW group. Embeddings, output heads, routers (``gate``, ``router``,
  ``shared_expert_gate``, ``...Router`` modules), norms and biases are plain by design.

Conv1D (GPT-2, GPT) stores its weight transposed: shape (in, out), forward ``x @ W``, so its heads
are column blocks and its input side is the row side. ``cross_head`` needs the ``nn.Linear``
layout (heads are row blocks, the shared basis is on the columns), so these groups set
``transposed=True``: the optimizer then steps the weight's transpose, a view, exactly as it would
step the equivalent ``nn.Linear`` weight. GPT-2's ``c_attn`` (n_embd, 3 n_embd) becomes 3 n_head
heads: the q, k and v heads share one input-side basis. The ``svd`` and ``randomized``
projectors do not care about the layout (``proj_type="std"`` projects the smaller side either
way), so other Conv1D weights need no flag.

A targeted weight that cannot be projected, and any other tensor of two or more dimensions left in
AdamW that is not plain by design, is listed, with the reason, in ``ParamGroupPlan.unplaced`` (and in a
warning from ``make_param_groups`` that says how much memory its full-size moments take): a weight not
selected by ``target_modules``, a ``rank`` not below the side it would project (which would save
nothing), a kernel of ``nn.Conv1d`` or ``nn.Conv3d`` (a 3-D tensor would be read as a stack of experts),
a tensor of a kind make_param_groups does not know, or a tensor tied to another parameter (GPT-2's ``lm_head`` and BERT's MLM ``decoder``
share the word embeddings; they are output heads, targeted only with ``include_lm_head``). A head
count that does not divide a query/key projection's outputs, and a ``target_modules`` entry that
matches no linear layer, raise instead.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Iterable

from torch import nn

from .adapters.targets import OUTPUT_HEAD_NAMES, name_matchers
from .step.shapes import stepped_shape
from .group_options import (
    check_hyperparameters, closest_key_hint, format_bytes, key_readers, projector_only_keys, unread_keys,
)

QUERY_NAMES = ("q_proj", "query", "wq", "q_lin", "q_attn")
KEY_NAMES = ("k_proj", "key", "wk", "k_lin")
FUSED_QKV_NAMES = ("qkv_proj", "query_key_value", "Wqkv", "qkv", "c_attn")
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


@dataclass
class ParamGroupPlan:
    """The groups for GaLorePlusAdamW and, by parameter name, where each parameter went.

    ``placement`` maps every trainable parameter's name to its group name; ``unplaced`` maps the
    name of each tensor of two or more dimensions left in AdamW that is not plain by design
    (embeddings, output heads, routers, biases) to the reason.
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
    """Whether a module name is targeted, as :func:`galore_plus.adapters.targets.name_matchers` (and peft) match it:
    ``"all-linear"`` every layer but output heads, a regex string must match the full name, a list holds name
    suffixes (whole dotted components)."""
    return any(matches(name) for matches in name_matchers(target_modules).values())


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
    """The 2-D weight of an ``nn.Linear`` or transformers ``Conv1D``, or the 4-D kernel of an ``nn.Conv2d``; None for
    other modules."""
    if isinstance(module, (nn.Linear, nn.Conv2d)) or is_conv1d(module):
        return module.weight
    return None


def is_router(name: str, module: nn.Module) -> bool:
    """Whether a module is a mixture-of-experts router (its few outputs choose experts; kept plain)."""
    return _leaf(name) in ROUTER_NAMES or type(module).__name__.lower().endswith("router")


def expert_stacks(module: nn.Module) -> dict[str, nn.Parameter]:
    """The 3-D parameters (E, m, n) of a module named like ``...Experts`` (a transformers 5 fused expert layer),
    by their leaf name; none for other modules."""
    if "expert" not in type(module).__name__.lower():
        return {}
    return {name: param for name, param in module.named_parameters(recurse=False) if param.dim() == 3}


def _plain_by_design(name: str, param: nn.Parameter, modules: dict[str, nn.Module]) -> bool:
    """Embeddings, output heads, routers, norms and biases: kept in AdamW on purpose, no warning."""
    owner_name = name.rsplit(".", 1)[0] if "." in name else ""
    owner = modules.get(owner_name)
    return (param.dim() < 2 or "bias" in _leaf(name) or isinstance(owner, nn.Embedding)
            or _leaf(owner_name) in OUTPUT_HEAD_NAMES or (owner is not None and is_router(owner_name, owner)))


def _check_arguments(arguments: dict[str, Any], group_options: dict[str, Any]) -> None:
    """Raise a TypeError/ValueError naming the argument of ``make_param_groups`` at fault."""
    for key in ("rank", "update_proj_gap"):
        value = arguments[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"make_param_groups: {key} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"make_param_groups: {key} must be >= 1, got {value}")
    for key in ("num_heads", "num_kv_heads"):
        value = arguments[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"make_param_groups: {key} must be None or an int >= 1, got {value!r}")
    for key in ("scale", "residual_ratio"):
        value = arguments[key]
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"make_param_groups: {key} must be a number, got {value!r}")
    if not 0.0 <= arguments["residual_ratio"] < 1.0:
        raise ValueError(f"make_param_groups: residual_ratio must be in [0, 1), got {arguments['residual_ratio']!r}")
    if arguments["projector"] == "cross_head":
        raise ValueError("make_param_groups: projector is the projector of the non-attention weights ('randomized' or "
                         "'svd'); query/key projections get 'cross_head' through cross_head=True")
    check_hyperparameters({k: v for k, v in arguments.items() if v is not None}, "make_param_groups(...)")
    valid = projector_only_keys()
    for key in group_options:
        if key not in valid:
            raise TypeError(f"make_param_groups got an unexpected keyword argument {key!r}"
                            f"{closest_key_hint(key, valid + tuple(arguments))}")


def _unmatched_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Entries of ``target_modules`` that select no ``nn.Linear``/``Conv1D`` module of ``model``."""
    names = [name for name, module in model.named_modules()
             if _projectable_weight(module) is not None or expert_stacks(module)]
    if isinstance(target_modules, str):
        return [] if any(module_matches(name, target_modules) for name in names) else [target_modules]
    return [entry for entry in target_modules if not any(module_matches(name, [entry]) for name in names)]


def _target_error(model: nn.Module, unmatched: list[str]) -> ValueError:
    leaves = sorted({_leaf(name) for name, module in model.named_modules() if _projectable_weight(module) is not None})
    hints = []
    for entry in unmatched:
        close = difflib.get_close_matches(entry, leaves, n=1)
        hints.append(f"{entry!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ValueError(f"make_param_groups: target_modules entry {', '.join(hints)} matches no nn.Linear or Conv1D "
                      f"module, so those weights would silently stay in AdamW; the model's linear layers are named "
                      f"{', '.join(leaves[:12])}{', ...' if len(leaves) > 12 else ''}")


def _projected_side_size(shape: tuple[int, int], cross_head: bool) -> int:
    """The side a weight's basis spans: the input side for ``cross_head``, else (``std``) the smaller side."""
    return shape[1] if cross_head else min(shape)


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
    lr: float | None = None,
    weight_decay: float | None = None,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    no_decay: Iterable[str] = (),
    **group_options: Any,
) -> ParamGroupPlan:
    """The plan behind :func:`make_param_groups` (same arguments), with where each parameter went."""
    arguments = dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale, residual_ratio=residual_ratio,
                     projector=projector, num_heads=num_heads, num_kv_heads=num_kv_heads, lr=lr,
                     weight_decay=weight_decay, betas=betas, eps=eps)
    _check_arguments(arguments, group_options)
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    unmatched = _unmatched_targets(model, target_modules)
    if unmatched:
        raise _target_error(model, unmatched)
    hyperparameters = {key: value for key, value in dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps).items()
                       if value is not None}
    canonical_names = {id(param): name for name, param in model.named_parameters()}
    no_decay = set(no_decay)
    unknown = sorted(no_decay - set(canonical_names.values()))
    if unknown:
        raise ValueError(f"make_param_groups: no_decay names parameters the model does not have: {unknown[:5]}")
    projected_options = dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale, **group_options)
    plan = ParamGroupPlan(groups=[])
    groups: dict[str, dict[str, Any]] = {}

    def place(group_name: str, param: nn.Parameter, param_name: str, options: dict[str, Any]) -> None:
        unread = set(unread_keys(options)) & set(group_options) if "rank" in options else set()
        options = {key: value for key, value in options.items() if key not in unread}   # options only where read
        options = dict(options, **hyperparameters)
        if param_name in no_decay:
            group_name, options["weight_decay"] = f"{group_name}_no_decay", 0.0
        groups.setdefault(group_name, {"params": [], "name": group_name, **options})["params"].append(param)
        plan.placement[param_name] = group_name

    for module_name, module in model.named_modules():
        if module_matches(module_name, target_modules):
            for leaf, stack in expert_stacks(module).items():
                stack_name = f"{module_name}.{leaf}"
                if not stack.requires_grad or canonical_names[id(stack)] != stack_name:
                    continue
                if rank >= min(stack.shape[-2:]):
                    plan.unplaced[stack_name] = (f"rank={rank} is not below the side of each expert "
                                                 f"{tuple(stack.shape[-2:])} of {tuple(stack.shape)}, so projecting "
                                                 "it saves nothing")
                    continue
                place(f"{projector}_experts", stack, stack_name, dict(projected_options, projector=projector))
        weight = _projectable_weight(module)
        if weight is None or not weight.requires_grad:
            continue
        is_head = _leaf(module_name) in OUTPUT_HEAD_NAMES
        if is_router(module_name, module) or not (module_matches(module_name, target_modules)
                                                  or (include_lm_head and is_head)):
            continue
        weight_name = f"{module_name}.weight"
        canonical = canonical_names[id(weight)]
        if canonical != weight_name:
            if canonical not in plan.placement:
                plan.unplaced[weight_name] = f"tied to {canonical} (the same tensor); tied weights stay in AdamW"
            continue
        attention = _leaf(module_name) in QUERY_NAMES + KEY_NAMES + FUSED_QKV_NAMES and weight.dim() == 2
        transposed = is_conv1d(module)
        shape = stepped_shape(weight, transposed)[-2:]   # each matrix of an expert stack
        side = _projected_side_size(shape, cross_head and attention)
        if rank >= side or rank > min(shape):
            plan.unplaced[weight_name] = (f"rank={rank} is not below the side of shape {tuple(weight.shape)} it would "
                                          f"project ({side}), so projecting it saves nothing")
            continue
        residual = {"residual_ratio": residual_ratio} if attention and residual_ratio > 0 else {}
        if cross_head and attention:
            heads = _head_count(model, module_name, num_heads, num_kv_heads)
            if shape[0] % heads:
                source = "from num_heads/num_kv_heads you passed" if num_heads or num_kv_heads else "from model.config"
                raise ValueError(
                    f"make_param_groups: {heads} heads ({source}) do not divide the {shape[0]} outputs of "
                    f"{weight_name}; pass the model's head counts as num_heads= (and num_kv_heads= for grouped-query "
                    "attention), or cross_head=False to project q/k without heads"
                )
            options = dict(projected_options, projector="cross_head", num_heads=heads, **residual)
            if transposed:
                options["transposed"] = True
            place(f"cross_head_{heads}_heads" + ("_transposed" if transposed else ""), weight, weight_name, options)
        else:
            name = f"{projector}_residual" if residual else projector
            place(name, weight, weight_name, dict(projected_options, projector=projector, **residual))

    modules = dict(model.named_modules())
    for param_name, param in model.named_parameters():
        if param.requires_grad and param_name not in plan.placement:
            place("adamw", param, param_name, {})
            if param_name not in plan.unplaced and not _plain_by_design(param_name, param, modules):
                plan.unplaced[param_name] = _plain_reason(param_name, param, modules, target_modules)
    plan.groups = list(groups.values())
    placed_keys = {key for group in plan.groups if "rank" in group for key in group}
    for key, value in group_options.items():
        if value is not None and key not in placed_keys and any("rank" in group for group in plan.groups):
            raise ValueError(f"make_param_groups: {key}={value!r} is read by {', '.join(key_readers(key)) or 'no projector'}"
                             ", and no projected group of this model has one of those; remove it, or choose the "
                             "projector or update_rule that reads it")
    return plan


def _plain_reason(name: str, param: nn.Parameter, modules: dict[str, nn.Module],
                  target_modules: str | list[str]) -> str:
    """Why a tensor of two or more dimensions that is not plain by design stays in AdamW."""
    owner_name = name.rsplit(".", 1)[0] if "." in name else ""
    owner = modules.get(owner_name)
    kind = type(owner).__name__ if owner is not None else "the model"
    if isinstance(owner, (nn.Conv1d, nn.Conv3d)):
        return (f"a {param.dim()}-D {kind} kernel: only nn.Conv2d kernels are projected (a 3-D tensor in a 'rank' "
                "group is read as a stack of expert matrices)")
    if (_projectable_weight(owner) is param or expert_stacks(owner)) and not module_matches(owner_name, target_modules):
        return "not selected by target_modules"
    return f"a {param.dim()}-D tensor of {kind} that make_param_groups does not know how to project"


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
    lr: float | None = None,
    weight_decay: float | None = None,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    no_decay: Iterable[str] = (),
    verbose: bool = False,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into GaLorePlusAdamW groups (see the module docstring).

    * query/key projections -> ``cross_head`` groups with ``residual_ratio``, one per head count
      (with ``cross_head=False``: a ``projector`` group with ``residual_ratio``);
    * fused q/k/v projections -> ``cross_head`` with H + 2 K heads (``transposed=True`` for Conv1D);
    * other matched 2-D ``nn.Linear`` and transformers ``Conv1D`` weights and ``nn.Conv2d`` kernels -> one
      ``projector`` group; the 3-D expert stacks of mixture-of-experts layers -> a ``{projector}_experts`` group;
    * everything else (embeddings, norms, biases, routers, the output head unless ``include_lm_head``, tied
      weights and matched weights with no side larger than ``rank``) -> a plain AdamW group; the tensors of
      two or more dimensions among them that are not plain by design are named in a warning with their bytes.

    ``lr``, ``weight_decay``, ``betas`` and ``eps``, when given, are set in every group; the
    parameters named in ``no_decay`` (e.g. norms and biases) go to ``*_no_decay`` groups with
    ``weight_decay=0``. ``group_options`` (projector keys, e.g. ``oversample=16``) are added to
    every projected group. An entry of ``target_modules`` that matches no linear layer, or a head
    count that does not divide a query/key projection, raises; targeted weights that cannot be
    projected are named in a warning; with ``verbose`` a summary of what went where is printed.
    """
    plan = plan_param_groups(
        model, rank=rank, update_proj_gap=update_proj_gap, scale=scale, target_modules=target_modules,
        residual_ratio=residual_ratio, projector=projector, cross_head=cross_head, num_heads=num_heads,
        num_kv_heads=num_kv_heads, include_lm_head=include_lm_head, lr=lr, weight_decay=weight_decay, betas=betas,
        eps=eps, no_decay=no_decay, **group_options,
    )
    if plan.unplaced:
        listed = "; ".join(f"{name}: {reason}" for name, reason in list(plan.unplaced.items())[:5])
        more = f" (and {len(plan.unplaced) - 5} more)" if len(plan.unplaced) > 5 else ""
        params = dict(model.named_parameters())
        kept = sum(2 * params[name].numel() * params[name].element_size() for name in plan.unplaced if name in params)
        warnings.warn(f"{len(plan.unplaced)} weight(s) of two or more dimensions are not projected and stay in the "
                      f"plain AdamW group with full-size moments ({format_bytes(kept)}): {listed}{more}", stacklevel=2)
    if residual_ratio > 0 and not any(group.get("residual_ratio", 0) > 0 for group in plan.groups):
        warnings.warn(f"make_param_groups: residual_ratio={residual_ratio} applies to query/key projections "
                      f"({', '.join(QUERY_NAMES + KEY_NAMES + FUSED_QKV_NAMES)}) and no targeted, projected weight "
                      "has such a name: no residual is used", stacklevel=2)
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
