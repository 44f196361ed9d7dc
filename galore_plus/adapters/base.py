"""The shared base of every adapter layer, the argument checks they share, and the per-call build context.

An adapter wraps a frozen ``nn.Linear`` (kept as ``base``) and adds a trainable branch. A method
is one subclass of :class:`AdapterLinear` in its own file; ``registry.py`` maps its name to it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

RESERVED_ARGUMENTS = ("base", "rank", "alpha", "dropout", "context")


def check_rank(rank: int, in_features: int, out_features: int, name: str = "rank") -> None:
    """Raise if ``rank`` is not an integer in ``[1, min(in_features, out_features)]``."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{name} must be an int, got {type(rank).__name__}")
    limit = min(in_features, out_features)
    if not 1 <= rank <= limit:
        raise ValueError(
            f"{name} must be between 1 and min(in_features, out_features) = {limit} "
            f"for a Linear({in_features}, {out_features}), got {rank}"
        )


def resolve_alpha(alpha: float | None, rank: int) -> float:
    """``alpha`` as a positive float, ``rank`` when it is ``None``."""
    alpha = float(rank) if alpha is None else float(alpha)
    if not alpha > 0.0:
        raise ValueError(f"alpha must be positive, got {alpha:g}")
    return alpha


def check_dropout(dropout: float) -> None:
    """Raise if ``dropout`` is not a probability in ``[0, 1)``."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def kaiming_uniform(
    rows: int, columns: int, generator: torch.Generator | None, a: float = 5**0.5
) -> torch.Tensor:
    """A ``(rows, columns)`` CPU float32 Kaiming-uniform matrix; the default ``a=√5`` is ``nn.Linear``'s."""
    return nn.init.kaiming_uniform_(torch.empty(rows, columns), a=a, generator=generator)


@dataclass
class BuildContext:
    """What the layers built by one ``add_adapters`` call share.

    ``generator`` draws the random initialisations in module order; ``shared`` holds objects that
    several layers use together (VeRA's projections per shape, DyLoRA's rank sampler, AdaLoRA's
    schedule), keyed by the method that made them.
    """

    seed: int
    generator: torch.Generator = field(init=False)
    shared: dict[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)


class AdapterLinear(nn.Module):
    """Base class: a frozen ``nn.Linear`` plus a trainable branch.

    Subclasses implement :meth:`delta_weight` (the additive ``(out, in)`` update) and
    :meth:`delta_output` (the update applied to an input, without forming the matrix). A method
    that is not a plain additive update overrides :meth:`adapter_output` and :meth:`merged_weight`
    too; one that changes the bias overrides :meth:`merged_bias`; one whose branch does not read the
    input alone overrides :meth:`forward`. A method with a model-wide training term (a
    regulariser, a step after the optimizer's) overrides :meth:`model_loss` / :meth:`model_step`, and
    one that keeps tensors for that overrides :meth:`training_state`.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(base, AdapterLinear):
            raise TypeError(f"cannot wrap a {type(base).__name__}: this layer already has an adapter")
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps an nn.Linear, got {type(base).__name__}")
        check_rank(rank, base.in_features, base.out_features)
        check_dropout(dropout)
        alpha = resolve_alpha(alpha, rank)
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()

    @classmethod
    def from_linear(
        cls, base: nn.Linear, rank: int, alpha: float | None, dropout: float, context: BuildContext
    ) -> AdapterLinear:
        """The adapter ``add_adapters`` puts in place of ``base``, its random initialisation drawn from
        ``context.generator`` (a subclass's ``__init__`` takes it as ``generator``). Methods with
        options or shared parts override this; their extra keyword arguments are the method's options."""
        return cls(base, rank, alpha, dropout, generator=context.generator)

    @classmethod
    def option_names(cls) -> list[str]:
        """The method-specific keyword arguments ``add_adapters`` accepts for this method."""
        parameters = inspect.signature(cls.from_linear).parameters
        return [name for name in parameters if name not in RESERVED_ARGUMENTS]

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.adapter_output(self.dropout(x))

    def delta_weight(self) -> torch.Tensor:
        """The update added to the base weight, shape ``(out, in)``."""
        raise NotImplementedError

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        """``delta_weight() @ x`` for a batch ``x``, computed without forming the ``(out, in)`` update."""
        raise NotImplementedError

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the adapter branch for the (dropped-out) input ``x``."""
        return self.delta_output(x)

    def merged_weight(self) -> torch.Tensor:
        """The ``(out, in)`` weight of a plain linear layer equal to this adapted layer."""
        return self.base.weight + self.delta_weight()

    def merged_bias(self) -> torch.Tensor | None:
        """The bias of that plain linear layer: the base bias unless the method changes it."""
        return self.base.bias

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapter's own parameters (the base layer's are excluded)."""
        return [p for name, p in self.named_parameters() if not name.startswith("base.")]

    def training_state(self) -> list[torch.Tensor]:
        """Tensors the method keeps for training besides parameters and optimizer state (none by default)."""
        return []

    @classmethod
    def model_loss(cls, layers: list[AdapterLinear]) -> torch.Tensor | None:
        """A term to add to the training loss for these layers of this class (none by default)."""
        return None

    @classmethod
    def model_step(cls, layers: list[AdapterLinear], step: int) -> None:
        """Work after the optimizer's step ``step`` for these layers of this class (none by default)."""

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Return a new ``nn.Linear`` holding the merged weight and bias."""
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
            merged.bias.copy_(self.merged_bias())
            merged.bias.requires_grad_(base.bias.requires_grad)
        return merged

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"
