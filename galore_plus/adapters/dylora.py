"""DyLoRA (Valipour et al.): a rank-r LoRA trained so that every leading rank b <= r works on its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import BuildContext
from .lora import LoRALinear


class DyLoRARankSampler:
    """Draws each training forward's rank uniformly from ``[low, high]`` with its own CPU generator.

    The global torch RNG is never used, so sampling ranks changes no other random stream, and the
    same seed gives the same sequence of ranks.
    """

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=self.generator))


class DyLoRALinear(LoRALinear):
    """DyLoRA: ``y = W x + b + (alpha / b) * B[:, :b] A[:b] x`` for a rank ``b`` in ``[min_rank, rank]``.

    In training mode every forward draws ``b`` from ``sampler`` (DyLoRA's Algorithm 1: ``b ~ p_B``,
    uniform), so only the leading ``b`` rows of ``lora_A`` and columns of ``lora_B`` get a gradient.
    With ``frozen=True`` only the ``b``-th row/column gets one (the paper's "frozen" variant: lower
    ranks are not updated when a higher one is trained). In eval mode, and for :meth:`merged_weight`,
    ``b`` is :attr:`active_rank` (``rank`` until :func:`set_adapter_rank` changes it). Initialised as
    LoRA (``lora_B = 0``), so a fresh layer equals the base layer. Trainable parameters:
    ``rank * (in + out)``.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
        min_rank: int = 1,
        frozen: bool = False,
        sampler: DyLoRARankSampler | None = None,
    ) -> None:
        super().__init__(base, rank, alpha, dropout, generator)
        if isinstance(min_rank, bool) or not isinstance(min_rank, int) or not 1 <= min_rank <= rank:
            raise ValueError(f"min_rank must be an int between 1 and rank = {rank}, got {min_rank!r}")
        if not isinstance(frozen, bool):
            raise TypeError(f"frozen must be a bool, got {type(frozen).__name__}")
        self.min_rank = min_rank
        self.frozen = frozen
        self.sampler = DyLoRARankSampler(0) if sampler is None else sampler
        self.active_rank = rank

    @classmethod
    def from_linear(
        cls,
        base: nn.Linear,
        rank: int,
        alpha: float | None,
        dropout: float,
        context: BuildContext,
        min_rank: int = 1,
        frozen: bool = False,
    ) -> DyLoRALinear:
        if "dylora" not in context.shared:
            context.shared["dylora"] = DyLoRARankSampler(context.seed)
        return cls(base, rank, alpha, dropout, context.generator, min_rank, frozen, context.shared["dylora"])

    def truncated_factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A[:rank], B[:, :rank])``; with ``frozen``, the components below ``rank`` carry no gradient."""
        A, B = self.lora_A[:rank], self.lora_B[:, :rank]
        if self.frozen and self.training:
            A = torch.cat([A[: rank - 1].detach(), A[rank - 1 :]])
            B = torch.cat([B[:, : rank - 1].detach(), B[:, rank - 1 :]], dim=1)
        return A, B

    def delta_weight(self) -> torch.Tensor:
        A, B = self.lora_A[: self.active_rank], self.lora_B[:, : self.active_rank]
        return (self.alpha / self.active_rank) * (B @ A)

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        rank = self.sampler.sample(self.min_rank, self.rank) if self.training else self.active_rank
        A, B = self.truncated_factors(rank)
        return (self.alpha / rank) * F.linear(F.linear(x, A), B)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, min_rank={self.min_rank}, active_rank={self.active_rank}, frozen={self.frozen}"


def set_adapter_rank(model: nn.Module, rank: int) -> None:
    """Evaluate and merge every DyLoRA layer of ``model`` at its leading ``rank`` components.

    Training still samples ranks; this sets the rank used in eval mode and by ``merge_adapters``.
    All layers are checked before any is changed.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, DyLoRALinear)]
    if not layers:
        raise ValueError("model has no DyLoRA adapters; call add_adapters(model, 'dylora', ...) first")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    for name, layer in layers:
        if not layer.min_rank <= rank <= layer.rank:
            raise ValueError(
                f"layer {name!r}: rank must be between min_rank = {layer.min_rank} and rank = {layer.rank}, got {rank}"
            )
    for _, layer in layers:
        layer.active_rank = rank
