"""Model-wide adapter functions: add, list parameters, merge, and the training hooks some methods need."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .base import AdapterLinear, BuildContext, check_dropout
from .registry import ADAPTERS
from .targets import adapter_names, replace_module, select_targets


def _check_options(method: str, options: dict[str, Any]) -> None:
    """Raise naming any keyword argument the method does not take."""
    known = ADAPTERS[method].option_names()
    unknown = [name for name in options if name not in known]
    if unknown:
        raise TypeError(
            f"add_adapters got option(s) {', '.join(map(repr, unknown))} that method {method!r} does not take; "
            f"its options are: {', '.join(known) or '(none)'}"
        )


def add_adapters(
    model: nn.Module,
    method: str,
    rank: int,
    alpha: float | None = None,
    target_modules: str | Iterable[str] = "all-linear",
    dropout: float = 0.0,
    seed: int = 0,
    **options: Any,
) -> list[str]:
    """Wrap the targeted ``nn.Linear`` layers of ``model`` in adapters, in place.

    Args:
        model: the model to adapt; it is modified in place.
        method: a name in :data:`ADAPTERS`: ``"lora"``, ``"dora"``, ``"vera"``, ``"dvora"``,
            ``"hydra"``, ``"dylora"`` or ``"adalora"``.
        rank: adapter rank, ``1 <= rank <= min(in_features, out_features)`` of every targeted layer
            (AdaLoRA: the initial rank of every layer).
        alpha: scaling numerator, ``s = alpha / rank``; ``None`` means ``alpha = rank`` (``s = 1``).
        target_modules: ``"all-linear"`` (every ``nn.Linear`` but ``lm_head``), a regular expression
            matched against full module names, or a list of name suffixes such as ``["q_proj", "v_proj"]``.
        dropout: dropout probability on the adapter branch's input.
        seed: seeds the random initialisations, VeRA's shared random matrices and DyLoRA's rank
            sampling, each through its own ``torch.Generator`` (the global RNG is not used).
        options: the method's own keyword arguments (DyLoRA: ``min_rank``, ``frozen``; AdaLoRA:
            ``target_rank``, ``total_steps`` and the schedule; see docs/adapters.md).

    Every parameter of ``model`` is frozen except the new adapters' (see :func:`adapter_parameters`).
    All arguments are checked before the model changes. Returns the names of the adapted layers,
    in module order.
    """
    if method not in ADAPTERS:
        raise ValueError(f"unknown adapter method {method!r}; expected one of {', '.join(ADAPTERS)}")
    _check_options(method, options)
    check_dropout(dropout)
    names = select_targets(model, target_modules)
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    context = BuildContext(seed)
    adapters = {}
    try:
        for name in names:
            try:
                adapters[name] = ADAPTERS[method].from_linear(
                    model.get_submodule(name), rank, alpha, dropout, context, **options
                )
            except (TypeError, ValueError) as err:
                raise type(err)(f"layer {name!r}: {err}") from None
    except BaseException:
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        raise
    model.requires_grad_(False)
    for name, adapter in adapters.items():
        replace_module(model, name, adapter)
    return names


def _adapters(model: nn.Module) -> list[AdapterLinear]:
    return [m for m in model.modules() if isinstance(m, AdapterLinear)]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of every adapter in ``model`` (pass these to the optimizer)."""
    adapters = _adapters(model)
    if not adapters:
        raise ValueError("model has no adapters; call add_adapters(model, ...) first")
    return [p for adapter in adapters for p in adapter.adapter_parameters()]


def _by_class(model: nn.Module) -> dict[type[AdapterLinear], list[AdapterLinear]]:
    groups: dict[type[AdapterLinear], list[AdapterLinear]] = {}
    for adapter in _adapters(model):
        groups.setdefault(type(adapter), []).append(adapter)
    return groups


def adapter_loss(model: nn.Module) -> torch.Tensor | float:
    """The terms the model's adapters add to the training loss (AdaLoRA's orthogonality
    regulariser); ``0.0`` when there are none, so ``loss + adapter_loss(model)`` works for any model."""
    terms = [cls.model_loss(layers) for cls, layers in _by_class(model).items()]
    terms = [term for term in terms if term is not None]
    return sum(terms[1:], terms[0]) if terms else 0.0


def adapter_step(model: nn.Module, step: int) -> None:
    """The model's adapters' work after optimizer step ``step`` (AdaLoRA's budget allocation).

    Call it after ``optimizer.step()`` and before ``optimizer.zero_grad()`` (it reads the
    gradients), with ``step`` counting optimizer steps from 1. A no-op for other methods.
    """
    for cls, layers in _by_class(model).items():
        cls.model_step(layers, step)


def adapter_training_state(model: nn.Module) -> list[torch.Tensor]:
    """Tensors the model's adapters keep for training besides parameters and optimizer state (AdaLoRA's
    importance averages), for memory accounting."""
    return [tensor for adapter in _adapters(model) for tensor in adapter.training_state()]


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every adapter in ``model`` by a plain ``nn.Linear`` with the merged weight, in place.

    Returns ``model``. The merged layers keep the base layer's ``requires_grad`` flags (frozen).
    """
    if isinstance(model, AdapterLinear):
        raise TypeError(f"model itself is a {type(model).__name__}; call its merge() method instead")
    names = adapter_names(model)
    if not names:
        raise ValueError("model has no adapters to merge; call add_adapters(model, ...) first")
    for name in names:
        replace_module(model, name, model.get_submodule(name).merge())
    return model
