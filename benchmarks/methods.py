"""The fine-tuning methods the benchmark compares, and how each one's optimizer is built.

A method is a :class:`MethodSpec`; :func:`unavailable_reason` says why one cannot run here (a
missing optional package), and :func:`build_optimizer` makes its optimizer for a fresh model (adding adapters for LoRA/DoRA).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

from galore_plus import GaLorePlusAdamW, make_param_groups

ABLATION_RATIOS = (0.0, 0.006, 0.012, 0.018)
RESIDUAL_MODES = ("exact", "paper")
HEADLINE_RATIO = 0.012


@dataclass(frozen=True)
class MethodSpec:
    """One method: ``family`` picks the optimizer, the other fields its variant."""

    name: str
    family: str
    description: str
    optim_bits: int = 32
    residual_ratio: float = 0.0
    residual_mode: str | None = None


@dataclass(frozen=True)
class OptimSettings:
    """The optimizer settings shared by every method (one learning rate for all, no tuning per method)."""

    lr: float
    weight_decay: float
    rank: int
    update_proj_gap: int
    scale: float
    lora_alpha: float | None


def _ablation_specs() -> list[MethodSpec]:
    specs = [MethodSpec("galore_plus_res0", "galore_plus", "GaLore+ without residual", residual_ratio=0.0)]
    for mode in RESIDUAL_MODES:
        for ratio in ABLATION_RATIOS[1:]:
            if (ratio, mode) == (HEADLINE_RATIO, "exact"):
                continue  # the headline galore_plus run is this point of the ablation
            specs.append(MethodSpec(f"galore_plus_res{ratio}_{mode}", "galore_plus",
                                    f"GaLore+ with residual {ratio:.1%}, {mode} mode", residual_ratio=ratio, residual_mode=mode))
    return specs


MAIN_METHODS: list[MethodSpec] = [
    MethodSpec("adamw", "adamw", "torch.optim.AdamW, all parameters"),
    MethodSpec("adamw8bit", "adamw8bit", "bitsandbytes.optim.AdamW8bit, all parameters"),
    MethodSpec("galore", "galore", "GaLorePlusAdamW, projector='svd' on all linear weights (GaLore)"),
    MethodSpec("galore_torch", "galore_torch", "galore_torch.GaLoreAdamW on all linear weights"),
    MethodSpec("galore_plus", "galore_plus", "GaLore+: cross_head q/k with residual, randomized elsewhere",
               residual_ratio=HEADLINE_RATIO, residual_mode="exact"),
    MethodSpec("galore_plus_8bit", "galore_plus", "GaLore+ with 8-bit moments",
               optim_bits=8, residual_ratio=HEADLINE_RATIO, residual_mode="exact"),
    MethodSpec("lora", "lora", "LoRA adapters (galore_plus.adapters) on all linear layers, AdamW"),
    MethodSpec("dora", "dora", "DoRA adapters (galore_plus.adapters) on all linear layers, AdamW"),
]
ABLATION_METHODS: list[MethodSpec] = _ablation_specs()
ALL_METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in MAIN_METHODS + ABLATION_METHODS}
METHOD_SETS: dict[str, list[str]] = {
    "all": list(ALL_METHODS),
    "main": [spec.name for spec in MAIN_METHODS],
    "ablation": ["galore_plus"] + [spec.name for spec in ABLATION_METHODS],
}


def resolve_methods(names: list[str]) -> list[MethodSpec]:
    """Method specs for names and set names (``all``, ``main``, ``ablation``), in order, without repeats."""
    resolved: list[str] = []
    for name in names:
        expanded = METHOD_SETS.get(name, [name])
        for item in expanded:
            if item not in ALL_METHODS:
                raise ValueError(f"unknown method {item!r}; known methods: {', '.join(ALL_METHODS)}; "
                                 f"sets: {', '.join(METHOD_SETS)}")
            if item not in resolved:
                resolved.append(item)
    return [ALL_METHODS[name] for name in resolved]


def unavailable_reason(spec: MethodSpec) -> str | None:
    """Why ``spec`` cannot run in this environment, or None when it can."""
    if (spec.family == "adamw8bit" or spec.optim_bits == 8) and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    if spec.family == "galore_torch" and importlib.util.find_spec("galore_torch") is None:
        return "galore_torch is not installed (pip install galore-torch)"
    return None


def _galore_torch_groups(groups: list[dict]) -> list[dict]:
    """make_param_groups' placement translated to galore_torch's group keys."""
    translated = []
    for group in groups:
        if "rank" in group:
            translated.append({"params": group["params"], "rank": group["rank"], "update_proj_gap": group["update_proj_gap"],
                               "scale": group["scale"], "proj_type": "std"})
        else:
            translated.append({"params": group["params"]})
    return translated


def build_optimizer(spec: MethodSpec, model: nn.Module, settings: OptimSettings, seed: int) -> torch.optim.Optimizer:
    """The optimizer of ``spec`` for ``model``; LoRA/DoRA first add adapters to ``model`` in place."""
    lr, weight_decay = settings.lr, settings.weight_decay
    if spec.family == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if spec.family == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(model.parameters(), lr=lr, weight_decay=weight_decay)
    if spec.family in ("lora", "dora"):
        from galore_plus.adapters import adapter_parameters, add_adapters

        add_adapters(model, spec.family, settings.rank, alpha=settings.lora_alpha, target_modules="all-linear", seed=seed)
        return torch.optim.AdamW(adapter_parameters(model), lr=lr, weight_decay=weight_decay)
    projector = "svd" if spec.family in ("galore", "galore_torch") else "randomized"
    groups = make_param_groups(model, rank=settings.rank, update_proj_gap=settings.update_proj_gap, scale=settings.scale,
                               projector=projector, cross_head=spec.family == "galore_plus",
                               residual_ratio=spec.residual_ratio)
    if spec.family == "galore_torch":
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW(_galore_torch_groups(groups), lr=lr, weight_decay=weight_decay)
    if spec.residual_mode is not None:
        for group in groups:
            if group.get("residual_ratio", 0) > 0:
                group["residual_mode"] = spec.residual_mode
    extra = {"optim_bits": 8} if spec.optim_bits == 8 else {}
    return GaLorePlusAdamW(groups, lr=lr, weight_decay=weight_decay, seed=seed, **extra)
