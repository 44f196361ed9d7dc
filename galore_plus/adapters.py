"""Weight-side low-rank adapters (LoRA, DoRA, VeRA) for side-by-side comparison with GaLore+.

Each adapter wraps an ``nn.Linear`` whose weight ``W`` (shape ``(out, in)``) and bias stay frozen:

* LoRA:  ``y = W x + b + s * B A x``                       with ``s = alpha / rank``
* DoRA:  ``y = m / ||W + s B A||_c * (W + s B A) x + b``   (norm per output feature, treated as a constant)
* VeRA:  ``y = W x + b + s * Λ_b B Λ_d A x``                (``A``, ``B`` frozen, random, shared per shape)

Dropout, when enabled, is applied to the input of the adapter branch only, as in ``peft``.
Only torch is needed; ``peft`` is used solely by the parity tests.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AdapterLinear",
    "LoRALinear",
    "DoRALinear",
    "VeRALinear",
    "VeRAProjections",
    "add_adapters",
    "merge_adapters",
    "adapter_parameters",
]

_MAX_NAMES_IN_ERRORS = 8


def _check_rank(rank: int, in_features: int, out_features: int) -> None:
    """Raise if ``rank`` is not an integer in ``[1, min(in_features, out_features)]``."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    limit = min(in_features, out_features)
    if not 1 <= rank <= limit:
        raise ValueError(
            f"rank must be between 1 and min(in_features, out_features) = {limit} "
            f"for a Linear({in_features}, {out_features}), got {rank}"
        )


def _resolve_alpha(alpha: float | None, rank: int) -> float:
    """``alpha`` as a positive float, ``rank`` when it is ``None``."""
    alpha = float(rank) if alpha is None else float(alpha)
    if alpha <= 0.0:
        raise ValueError(f"alpha must be positive, got {alpha:g}")
    return alpha


def _check_dropout(dropout: float) -> None:
    """Raise if ``dropout`` is not a probability in ``[0, 1)``."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


class AdapterLinear(nn.Module):
    """Base class: a frozen ``nn.Linear`` plus a trainable low-rank branch.

    Subclasses implement :meth:`adapter_output` (the branch added to the base output, given the
    dropped-out input) and :meth:`merged_weight` (the single weight equivalent to the adapted layer).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(base, AdapterLinear):
            raise TypeError(f"cannot wrap a {type(base).__name__}: this layer already has an adapter")
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps an nn.Linear, got {type(base).__name__}")
        _check_rank(rank, base.in_features, base.out_features)
        _check_dropout(dropout)
        alpha = _resolve_alpha(alpha, rank)
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.adapter_output(self.dropout(x))

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the adapter branch for the (dropped-out) input ``x``."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """The ``(out, in)`` weight of a plain linear layer equal to this adapted layer."""
        raise NotImplementedError

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapter's own parameters (the base layer's are excluded)."""
        return [p for name, p in self.named_parameters() if not name.startswith("base.")]

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Return a new ``nn.Linear`` holding the merged weight and the base bias."""
        base = self.base
        merged = nn.Linear(
            self.in_features,
            self.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        merged.weight.copy_(self.merged_weight())
        merged.weight.requires_grad_(base.weight.requires_grad)
        if base.bias is not None:
            merged.bias.copy_(base.bias)
            merged.bias.requires_grad_(base.bias.requires_grad)
        return merged

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


class LoRALinear(AdapterLinear):
    """LoRA: ``y = W x + b + (alpha / rank) * B A x``.

    ``lora_A`` (rank, in) is Kaiming-uniform initialised as in ``nn.Linear``; ``lora_B`` (out, rank)
    starts at zero, so the adapted layer initially equals the base layer.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(base, rank, alpha, dropout)
        weight = base.weight
        lora_A = torch.empty(rank, self.in_features)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(lora_A.to(device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(weight.new_zeros(self.out_features, rank))

    def delta_weight(self) -> torch.Tensor:
        """The scaled low-rank update ``s * B A``, shape ``(out, in)``."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """``s * B A x`` computed without forming ``B A``."""
        return self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_output(x)

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.delta_weight()


class DoRALinear(LoRALinear):
    """DoRA: ``y = m / ||W + s B A||_c * (W + s B A) x + b``.

    ``||.||_c`` is the L2 norm of each output feature's weight row (``dim=1`` of the ``(out, in)``
    weight), so ``magnitude`` has one entry per output feature and starts at ``||W||_c``. As in the
    DoRA paper (Sec. 4.3) and ``peft``, the norm is detached: it gets no gradient.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(base, rank, alpha, dropout, generator)
        self.magnitude = nn.Parameter(self.weight_norm())

    def weight_norm(self) -> torch.Tensor:
        """Detached norm ``||W + s B A||_c`` per output feature, shape ``(out,)``."""
        with torch.no_grad():
            return torch.linalg.vector_norm(self.base.weight + self.delta_weight(), dim=1)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.magnitude / self.weight_norm()
        return (scale - 1.0) * F.linear(x, self.base.weight) + scale * self.lora_output(x)

    def merged_weight(self) -> torch.Tensor:
        scale = self.magnitude / self.weight_norm()
        return scale.unsqueeze(1) * (self.base.weight + self.delta_weight())


class VeRAProjections(nn.Module):
    """Frozen random ``A`` (rank, in) and ``B`` (out, rank) shared by VeRA layers of one shape.

    Both are Kaiming-uniform draws from a CPU generator seeded with ``seed``, so they are a fixed
    function of ``(in_features, out_features, rank, seed)``. They are non-persistent buffers: they
    are left out of ``state_dict()`` and rebuilt from the seed when adapters are added again.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        A = nn.init.kaiming_uniform_(torch.empty(rank, in_features), generator=generator)
        B = nn.init.kaiming_uniform_(torch.empty(out_features, rank), generator=generator)
        self.seed = seed
        self.register_buffer("A", A.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("B", B.to(device=device, dtype=dtype), persistent=False)

    def extra_repr(self) -> str:
        rank, in_features = self.A.shape
        return f"in_features={in_features}, out_features={self.B.shape[0]}, rank={rank}, seed={self.seed}"


class VeRALinear(AdapterLinear):
    """VeRA: ``y = W x + b + (alpha / rank) * Λ_b B Λ_d A x``.

    Only ``lambda_d`` (rank,) and ``lambda_b`` (out,) are trained; they start at 0.1 and 0 as in
    ``peft``. ``projections`` holds the frozen ``A`` and ``B``; pass the same instance to every layer
    of one shape to share them, or leave it out to build them from ``seed``. The VeRA paper has no
    ``alpha``; the default ``alpha=rank`` gives ``s = 1``, which is the paper's and ``peft``'s layer.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        projections: VeRAProjections | None = None,
        seed: int = 0,
        d_initial: float = 0.1,
    ) -> None:
        super().__init__(base, rank, alpha, dropout)
        weight = base.weight
        if projections is None:
            projections = VeRAProjections(
                self.in_features, self.out_features, rank, seed, device=weight.device, dtype=weight.dtype
            )
        expected = ((rank, self.in_features), (self.out_features, rank))
        if (tuple(projections.A.shape), tuple(projections.B.shape)) != expected:
            raise ValueError(
                f"VeRA projections have A {tuple(projections.A.shape)} and B {tuple(projections.B.shape)}, "
                f"expected A {expected[0]} and B {expected[1]}"
            )
        self.projections = projections
        self.lambda_d = nn.Parameter(weight.new_full((rank,), d_initial))
        self.lambda_b = nn.Parameter(weight.new_zeros(self.out_features))

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.lambda_d * F.linear(x, self.projections.A)
        return self.scaling * self.lambda_b * F.linear(hidden, self.projections.B)

    def merged_weight(self) -> torch.Tensor:
        B = self.lambda_b.unsqueeze(1) * self.projections.B
        A = self.lambda_d.unsqueeze(1) * self.projections.A
        return self.base.weight + self.scaling * (B @ A)


_METHODS = ("lora", "dora", "vera")


# nn.MultiheadAttention reads its out_proj weight directly instead of calling the layer.
_UNWRAPPABLE = (nn.modules.linear.NonDynamicallyQuantizableLinear,)


def _linear_names(model: nn.Module) -> list[str]:
    """Names of the wrappable ``nn.Linear`` modules of ``model`` (not the bases of adapters)."""
    bases = {id(module.base) for module in model.modules() if isinstance(module, AdapterLinear)}
    return [
        name
        for name, module in model.named_modules()
        if name
        and isinstance(module, nn.Linear)
        and not isinstance(module, _UNWRAPPABLE)
        and id(module) not in bases
    ]


def _adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapter layers of ``model``."""
    return [name for name, module in model.named_modules() if isinstance(module, AdapterLinear)]


def _some_names(names: Sequence[str]) -> str:
    """A short, readable sample of module names for error messages."""
    shown = ", ".join(names[:_MAX_NAMES_IN_ERRORS])
    more = len(names) - _MAX_NAMES_IN_ERRORS
    return (shown + (f", ... ({more} more)" if more > 0 else "")) or "(none)"


def _matches_suffix(name: str, suffix: str) -> bool:
    """True if ``suffix`` is the whole of ``name`` or its trailing dotted components."""
    return name == suffix or name.endswith("." + suffix)


def _name_matchers(target_modules: str | Iterable[str]) -> dict[str, Callable[[str], bool]]:
    """One module-name predicate per pattern of ``target_modules``.

    ``"all-linear"`` accepts every name but ``lm_head``; any other string is a regular expression
    that must match the full module name; a list holds name suffixes (whole dotted components).
    """
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return {target_modules: lambda name: name.split(".")[-1] != "lm_head"}
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


def _select_targets(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules selected by ``target_modules``, in module order.

    Raises if a pattern selects a layer that already has an adapter or selects no layer at all.
    """
    linear = _linear_names(model)
    adapted = _adapter_names(model)
    selected = set()
    for pattern, matches in _name_matchers(target_modules).items():
        already = [name for name in adapted if matches(name)]
        if already:
            raise ValueError(
                f"target_modules {pattern!r} selects layers that already have adapters: "
                f"{_some_names(already)}"
            )
        names = [name for name in linear if matches(name)]
        if not names:
            raise ValueError(
                f"target_modules {pattern!r} matches no nn.Linear module; "
                f"the model's nn.Linear modules are: {_some_names(linear)}"
            )
        selected.update(names)
    return [name for name in linear if name in selected]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` inside ``model``."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)


def add_adapters(
    model: nn.Module,
    method: str,
    rank: int,
    alpha: float | None = None,
    target_modules: str | Iterable[str] = "all-linear",
    dropout: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """Wrap the targeted ``nn.Linear`` layers of ``model`` in adapters, in place.

    Args:
        model: the model to adapt; it is modified in place.
        method: ``"lora"``, ``"dora"`` or ``"vera"``.
        rank: adapter rank, ``1 <= rank <= min(in_features, out_features)`` of every targeted layer.
        alpha: scaling numerator, ``s = alpha / rank``; ``None`` means ``alpha = rank`` (``s = 1``).
        target_modules: ``"all-linear"`` (every ``nn.Linear`` but ``lm_head``), a regular expression
            matched against full module names, or a list of name suffixes such as ``["q_proj", "v_proj"]``.
        dropout: dropout probability on the adapter branch's input.
        seed: seeds LoRA/DoRA's ``A`` initialisation and VeRA's shared random matrices.

    Every parameter of ``model`` is frozen except the new adapters' (see :func:`adapter_parameters`).
    Returns the names of the adapted layers, in module order.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown adapter method {method!r}; expected one of {', '.join(_METHODS)}")
    _check_dropout(dropout)
    names = _select_targets(model, target_modules)
    layers = {name: model.get_submodule(name) for name in names}
    for name, layer in layers.items():
        try:
            _check_rank(rank, layer.in_features, layer.out_features)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
    _resolve_alpha(alpha, rank)

    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    shared: dict[tuple[int, int, torch.device, torch.dtype], VeRAProjections] = {}
    for name, layer in layers.items():
        if method == "lora":
            adapter = LoRALinear(layer, rank, alpha, dropout, generator)
        elif method == "dora":
            adapter = DoRALinear(layer, rank, alpha, dropout, generator)
        else:
            device, dtype = layer.weight.device, layer.weight.dtype
            key = (layer.in_features, layer.out_features, device, dtype)
            if key not in shared:
                shared[key] = VeRAProjections(
                    layer.in_features, layer.out_features, rank, seed, device=device, dtype=dtype
                )
            adapter = VeRALinear(layer, rank, alpha, dropout, shared[key])
        _replace(model, name, adapter)
    return names


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of every adapter in ``model`` (pass these to the optimizer)."""
    adapters = [m for m in model.modules() if isinstance(m, AdapterLinear)]
    if not adapters:
        raise ValueError("model has no adapters; call add_adapters(model, ...) first")
    return [p for adapter in adapters for p in adapter.adapter_parameters()]


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every adapter in ``model`` by a plain ``nn.Linear`` with the merged weight, in place.

    Returns ``model``. The merged layers keep the base layer's ``requires_grad`` flags (frozen).
    """
    if isinstance(model, AdapterLinear):
        raise TypeError(f"model itself is a {type(model).__name__}; call its merge() method instead")
    names = _adapter_names(model)
    if not names:
        raise ValueError("model has no adapters to merge; call add_adapters(model, ...) first")
    for name in names:
        _replace(model, name, model.get_submodule(name).merge())
    return model
