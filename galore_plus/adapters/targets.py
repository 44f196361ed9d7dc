"""Which ``nn.Linear`` modules of a model ``target_modules`` selects, and putting a module in place of another."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from .base import AdapterLinear

MAX_NAMES_IN_ERRORS = 8

# nn.MultiheadAttention reads its out_proj weight directly instead of calling the layer.
UNWRAPPABLE = (nn.modules.linear.NonDynamicallyQuantizableLinear,)

# Last name components of output heads: "all-linear" leaves them out (peft leaves out the output layer).
OUTPUT_HEAD_NAMES = ("lm_head", "output", "embed_out", "classifier", "score", "decoder", "vocab_projector")


def linear_names(model: nn.Module) -> list[str]:
    """Names of the wrappable ``nn.Linear`` modules of ``model`` (not the bases of adapters)."""
    bases = {id(module.base) for module in model.modules() if isinstance(module, AdapterLinear)}
    return [
        name
        for name, module in model.named_modules()
        if name
        and isinstance(module, nn.Linear)
        and not isinstance(module, UNWRAPPABLE)
        and id(module) not in bases
    ]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapter layers of ``model``."""
    return [name for name, module in model.named_modules() if isinstance(module, AdapterLinear)]


def some_names(names: Sequence[str]) -> str:
    """A short, readable sample of module names for error messages."""
    shown = ", ".join(names[:MAX_NAMES_IN_ERRORS])
    more = len(names) - MAX_NAMES_IN_ERRORS
    return (shown + (f", ... ({more} more)" if more > 0 else "")) or "(none)"


def _matches_suffix(name: str, suffix: str) -> bool:
    """True if ``suffix`` is the whole of ``name`` or its trailing dotted components."""
    return name == suffix or name.endswith("." + suffix)


def name_matchers(target_modules: str | Iterable[str]) -> dict[str, Callable[[str], bool]]:
    """One module-name predicate per pattern of ``target_modules``.

    ``"all-linear"`` accepts every name but an output head's (last component in :data:`OUTPUT_HEAD_NAMES`, as
    :func:`galore_plus.groups.module_matches` reads it); any other string is a regular expression
    that must match the full module name; a list holds name suffixes (whole dotted components).
    """
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return {target_modules: lambda name: name.split(".")[-1] not in OUTPUT_HEAD_NAMES}
        try:
            regex = re.compile(target_modules)
        except re.error as err:
            raise ValueError(
                f"target_modules {target_modules!r} is not a valid regular expression: {err}"
            ) from err
        return {target_modules: lambda name: regex.fullmatch(name) is not None}
    if isinstance(target_modules, Iterable):
        suffixes = list(target_modules)
        if not suffixes or not all(isinstance(s, str) and s for s in suffixes):
            raise TypeError(
                f"target_modules must be a non-empty list of non-empty strings, got {target_modules!r}"
            )
        return {s: functools.partial(_matches_suffix, suffix=s) for s in suffixes}
    raise TypeError(
        f"target_modules must be 'all-linear', a regex string or a list of names, got {target_modules!r}"
    )


def select_targets(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules selected by ``target_modules``, in module order.

    Raises if a pattern selects a layer that already has an adapter or selects no layer at all.
    """
    linear = linear_names(model)
    adapted = adapter_names(model)
    selected = set()
    for pattern, matches in name_matchers(target_modules).items():
        already = [name for name in adapted if matches(name)]
        if already:
            raise ValueError(
                f"target_modules {pattern!r} selects layers that already have adapters: "
                f"{some_names(already)}"
            )
        names = [name for name in linear if matches(name)]
        if not names:
            raise ValueError(
                f"target_modules {pattern!r} matches no nn.Linear module; "
                f"the model's nn.Linear modules are: {some_names(linear)}"
            )
        selected.update(names)
    return [name for name in linear if name in selected]


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` inside ``model``."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)
