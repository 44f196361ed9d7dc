"""AdaLoRA (Zhang et al.): an SVD-form update ``P diag(λ) Q`` whose total rank is pruned to a budget by importance.

The layer is :class:`AdaLoRALinear`. The model-wide parts run through the base class's hooks:
:meth:`AdaLoRALinear.model_loss` is the orthogonality regulariser (add it to the loss) and
:meth:`AdaLoRALinear.model_step` is the budget allocator (call it after each optimizer step);
``add_adapters``' ``adapter_loss`` and ``adapter_step`` call them. The conventions follow ``peft``'s
AdaLoRA so that the two agree (tests/test_adapters_adalora.py): see docs/adapters.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLinear, BuildContext

INIT_STD = 0.02


@dataclass(frozen=True)
class AdaLoRASchedule:
    """The budget schedule and importance settings shared by the AdaLoRA layers of one ``add_adapters`` call.

    The total budget (kept components over all layers) stays at its initial value ``rank * layers``
    for steps ``<= warmup_steps``, then falls as a cubic to ``target_rank * layers`` at step
    ``total_steps - final_steps``, pruning every ``interval`` steps; after that the kept components
    are fixed and only trained. ``beta1`` and ``beta2`` smooth the sensitivity and its uncertainty;
    ``orth_reg_weight`` weighs the orthogonality regulariser.
    """

    target_rank: int
    total_steps: int
    warmup_steps: int = 0
    final_steps: int = 0
    interval: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    def __post_init__(self) -> None:
        for name in ("target_rank", "total_steps", "interval"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "final_steps"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if not self.orth_reg_weight >= 0.0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if not self.warmup_steps < self.total_steps - self.final_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be less than total_steps - final_steps "
                f"({self.total_steps} - {self.final_steps}): the schedule needs a pruning phase"
            )

    @property
    def final_start(self) -> int:
        """The step at which the final budget is fixed."""
        return self.total_steps - self.final_steps

    def budget(self, step: int, initial: int, target: int) -> tuple[int, bool]:
        """(the budget at ``step``, whether components are pruned to it at this step).

        ``initial`` and ``target`` are the total initial and target budgets.
        """
        if step <= self.warmup_steps:
            return initial, False
        if step > self.final_start:
            return target, True
        remaining = 1.0 - (step - self.warmup_steps) / (self.final_start - self.warmup_steps)
        return int((initial - target) * remaining**3 + target), step % self.interval == 0


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


class AdaLoRALinear(AdapterLinear):
    """AdaLoRA: ``y = W x + b + (alpha / rank) * P diag(λ) Q x``.

    ``left`` ``P`` (out, rank) and ``right`` ``Q`` (rank, in) start as N(0, 0.02²) draws and
    ``singular_values`` ``λ`` (rank,) at zero, as in ``peft``, so a fresh layer equals the base layer.
    The scaling keeps the initial ``rank`` while components are pruned. ``rank_mask`` (a buffer,
    saved in the state dict) marks the components kept by the last allocation; pruning sets the
    dropped ``λ_i`` to zero. Trainable parameters: ``rank * (in + out + 1)``.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        schedule: AdaLoRASchedule,
        alpha: float | None = None,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(base, rank, alpha, dropout)
        if not isinstance(schedule, AdaLoRASchedule):
            raise TypeError(f"schedule must be an AdaLoRASchedule, got {type(schedule).__name__}")
        if not schedule.target_rank < rank:
            raise ValueError(f"target_rank must be less than rank = {rank}, got {schedule.target_rank}")
        weight = base.weight
        left = torch.empty(self.out_features, rank).normal_(0.0, INIT_STD, generator=generator)
        right = torch.empty(rank, self.in_features).normal_(0.0, INIT_STD, generator=generator)
        self.left = nn.Parameter(left.to(device=weight.device, dtype=weight.dtype))
        self.singular_values = nn.Parameter(weight.new_zeros(rank))
        self.right = nn.Parameter(right.to(device=weight.device, dtype=weight.dtype))
        self.register_buffer("rank_mask", torch.ones(rank, dtype=torch.bool, device=weight.device))
        self.schedule = schedule
        self.sensitivity: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_linear(
        cls,
        base: nn.Linear,
        rank: int,
        alpha: float | None,
        dropout: float,
        context: BuildContext,
        *,
        target_rank: int,
        total_steps: int,
        warmup_steps: int = 0,
        final_steps: int = 0,
        interval: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_reg_weight: float = 0.5,
    ) -> AdaLoRALinear:
        if "adalora" not in context.shared:
            context.shared["adalora"] = AdaLoRASchedule(
                target_rank, total_steps, warmup_steps, final_steps, interval, beta1, beta2, orth_reg_weight
            )
        return cls(base, rank, context.shared["adalora"], alpha, dropout, context.generator)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.left * self.singular_values) @ self.right

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * F.linear(F.linear(x, self.right) * self.singular_values, self.left)

    def factors(self) -> dict[str, nn.Parameter]:
        """``P``, ``λ`` and ``Q`` by name: the parameters whose importance is tracked."""
        return {"left": self.left, "singular_values": self.singular_values, "right": self.right}

    def orthogonality_residuals(self) -> list[torch.Tensor]:
        """``||PᵀP - I||_F`` and ``||QQᵀ - I||_F``."""
        eye = torch.eye(self.rank, device=self.left.device, dtype=self.left.dtype)
        return [
            torch.linalg.matrix_norm(self.left.T @ self.left - eye),
            torch.linalg.matrix_norm(self.right @ self.right.T - eye),
        ]

    @torch.no_grad()
    def update_sensitivity(self) -> None:
        """Smoothed sensitivity ``Ī`` and uncertainty ``Ū`` of every entry of ``P``, ``λ``, ``Q``,
        from the sensitivity ``|w * ∇w|`` of this step."""
        beta1, beta2 = self.schedule.beta1, self.schedule.beta2
        for name, p in self.factors().items():
            if p.grad is None:
                raise RuntimeError(
                    f"AdaLoRA's {name} has no gradient: call adapter_step(model, step) after backward() "
                    "and before zero_grad()"
                )
            sensitivity = (p * p.grad).abs()
            average, uncertainty = self.sensitivity.get(name, (torch.zeros_like(p), torch.zeros_like(p)))
            average = beta1 * average + (1 - beta1) * sensitivity
            uncertainty = beta2 * uncertainty + (1 - beta2) * (sensitivity - average).abs()
            self.sensitivity[name] = (average, uncertainty)

    def training_state(self) -> list[torch.Tensor]:
        """The importance averages ``Ī`` and ``Ū`` (until the final phase frees them)."""
        return [tensor for pair in self.sensitivity.values() for tensor in pair]

    def component_scores(self) -> torch.Tensor:
        """Importance ``S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)`` with ``s = Ī * Ū``, shape ``(rank,)``."""
        if not self.sensitivity:
            raise RuntimeError("AdaLoRA has no importance scores yet: call adapter_step(model, step) every step")
        score = {name: average * uncertainty for name, (average, uncertainty) in self.sensitivity.items()}
        return score["singular_values"] + score["left"].mean(dim=0) + score["right"].mean(dim=1)

    @torch.no_grad()
    def keep(self, mask: torch.Tensor) -> None:
        """Keep the components in ``mask`` from now on and zero the singular values of the others."""
        self.rank_mask.copy_(mask)
        self.zero_dropped()

    @torch.no_grad()
    def zero_dropped(self) -> None:
        """Zero the singular values of the components ``rank_mask`` drops (training revives them)."""
        self.singular_values.masked_fill_(~self.rank_mask, 0.0)

    @classmethod
    def model_loss(cls, layers: list[AdapterLinear]) -> torch.Tensor | None:
        """``orth_reg_weight`` times the mean of the layers' orthogonality residuals (per schedule)."""
        total = None
        for schedule, group in _by_schedule(layers):
            residuals = [r for layer in group for r in layer.orthogonality_residuals()]
            term = schedule.orth_reg_weight * torch.stack(residuals).mean()
            total = term if total is None else total + term
        return total

    @classmethod
    def model_step(cls, layers: list[AdapterLinear], step: int) -> None:
        """AdaLoRA's budget allocation after the optimizer's step ``step`` (as ``peft``'s ``update_and_allocate``)."""
        for schedule, group in _by_schedule(layers):
            allocate(group, schedule, step)


def _by_schedule(layers: list[AdapterLinear]) -> list[tuple[AdaLoRASchedule, list[AdaLoRALinear]]]:
    """The layers grouped by the schedule object they share (one group per ``add_adapters`` call)."""
    groups: dict[int, list[AdaLoRALinear]] = {}
    for layer in layers:
        groups.setdefault(id(layer.schedule), []).append(layer)
    return [(group[0].schedule, group) for group in groups.values()]


def prune_to_budget(layers: list[AdaLoRALinear], budget: int) -> None:
    """Keep the ``budget`` most important components over all ``layers`` (ties at the threshold are dropped)."""
    scores = [layer.component_scores() for layer in layers]
    pruned = sum(layer.rank for layer in layers) - budget
    threshold = torch.kthvalue(torch.cat(scores), pruned).values
    for layer, score in zip(layers, scores):
        layer.keep(score > threshold)


def allocate(layers: list[AdaLoRALinear], schedule: AdaLoRASchedule, step: int) -> None:
    """One allocation step: before the final phase update the importance and prune to the step's
    budget when it is due; at its start fix the target budget; during it re-zero the dropped values."""
    initial = sum(layer.rank for layer in layers)
    target = schedule.target_rank * len(layers)
    if step < schedule.final_start:
        for layer in layers:
            layer.update_sensitivity()
        budget, due = schedule.budget(step, initial, target)
        if due:
            prune_to_budget(layers, budget)
    elif step == schedule.final_start:
        prune_to_budget(layers, target)
        for layer in layers:
            layer.sensitivity.clear()
    else:
        for layer in layers:
            layer.zero_dropped()
