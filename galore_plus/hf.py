"""``GaLorePlusTrainer``: ``transformers.Trainer`` with GaLorePlusAdamW, optionally with per-layer steps.

::

    from galore_plus.hf import GaLorePlusTrainer

    args = TrainingArguments(..., learning_rate=1e-3, weight_decay=0.01, max_grad_norm=0)
    trainer = GaLorePlusTrainer(model=model, args=args, train_dataset=data,
                                galore=dict(rank=128, update_proj_gap=200, residual_ratio=0.012),
                                per_layer=True, optim_bits=8, seed=0)
    trainer.train()                     # or trainer.train(resume_from_checkpoint=path)

What it does that the plain Trainer with ``optimizer_cls_and_kwargs`` does not:

* builds the groups with :func:`galore_plus.make_param_groups` from the model the Trainer holds when
  it creates the optimizer (``galore`` holds make_param_groups' arguments), so nothing has to be
  rebuilt for a second Trainer;
* passes ``TrainingArguments.learning_rate``, ``adam_beta1``/``adam_beta2``, ``adam_epsilon`` and
  ``weight_decay`` to every group, and applies the Trainer's own no-decay rule
  (``Trainer.get_decay_parameter_names``: biases and normalisation weights get ``weight_decay=0``;
  embeddings are decayed, as by the Trainer's AdamW);
* ``per_layer=True`` steps each parameter during backward (:mod:`galore_plus.per_layer`). With
  ``gradient_accumulation_steps > 1`` or ``max_grad_norm > 0`` it uses per-layer accumulation
  (``enable_per_layer_steps(optimizer, accumulation_steps=gradient_accumulation_steps)``,
  :mod:`galore_plus.step.accumulate`): each micro-batch's gradient of a projected weight is projected into
  the subspace and freed, the weights step once per update at the Trainer's ``optimizer.step()``, so
  the LR schedule steps once per update, and clipping and the logged ``grad_norm`` use
  :meth:`~galore_plus.per_layer.PerLayerSteps.clip_grad_norm_`'s norm. Without either, every
  parameter steps during backward and no ``grad_norm`` is logged (the gradients are gone when the
  Trainer computes it). An optimizer with per-layer steps passed through ``optimizers=(optimizer,
  None)`` must have been enabled with ``accumulation_steps=gradient_accumulation_steps`` when the
  arguments need accumulation or clipping; otherwise a ``ValueError`` says so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

try:
    import transformers
except ImportError as error:  # pragma: no cover - transformers is an optional extra
    raise ImportError("galore_plus.hf needs transformers: pip install transformers") from error

from .groups import make_param_groups
from .optimizer import GaLorePlusAdamW
from .per_layer import enable_per_layer_steps, per_layer_handle


def unwrapped_optimizer(optimizer: Any) -> Any:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` wrapper (or the optimizer itself)."""
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class GaLorePlusTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains with GaLorePlusAdamW (see the module docstring).

    ``galore``: keyword arguments of :func:`galore_plus.make_param_groups` (``rank`` is required).
    ``per_layer``: step each parameter during backward, or with gradient accumulation or clipping
    once per update from the accumulated low-rank gradients. ``optim_bits`` and ``seed`` go to
    :class:`GaLorePlusAdamW`.
    """

    def __init__(self, *args: Any, galore: dict[str, Any] | None = None, per_layer: bool = False,
                 optim_bits: int = 32, seed: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.optimizer_cls_and_kwargs is not None:
            raise ValueError("GaLorePlusTrainer builds GaLorePlusAdamW itself; pass make_param_groups' arguments as "
                             "galore=dict(rank=...) instead of optimizer_cls_and_kwargs")
        if self.optimizer is not None and galore:
            raise ValueError("GaLorePlusTrainer got both a built optimizer (optimizers=...) and galore=...; pass one")
        if self.optimizer is None and not galore or (galore and "rank" not in galore):
            raise ValueError("GaLorePlusTrainer needs galore=dict(rank=..., ...): the arguments of "
                             "galore_plus.make_param_groups (or a built optimizer through optimizers=(opt, None))")
        from_arguments = sorted(set(galore or {}) & {"lr", "weight_decay", "betas", "eps", "no_decay"})
        if from_arguments:
            raise ValueError(f"GaLorePlusTrainer: {', '.join(from_arguments)} in galore=... come from TrainingArguments "
                             "(learning_rate, weight_decay, adam_beta1/2, adam_epsilon, the Trainer's no-decay rule); "
                             "remove them from galore")
        self.galore = dict(galore or {})
        self.per_layer = per_layer
        self.optim_bits = optim_bits
        self.galore_seed = seed
        self.per_layer_steps = None

    def galore_param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """make_param_groups with the TrainingArguments' hyperparameters and the Trainer's no-decay rule."""
        decay = set(self.get_decay_parameter_names(model))
        no_decay = [name for name, param in model.named_parameters() if param.requires_grad and name not in decay]
        return make_param_groups(
            model, lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon, weight_decay=self.args.weight_decay, no_decay=no_decay, **self.galore,
        )

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            self.optimizer = GaLorePlusAdamW(
                self.galore_param_groups(opt_model), lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
                weight_decay=self.args.weight_decay, seed=self.galore_seed, optim_bits=self.optim_bits,
            )
            if self.per_layer:
                accumulation = self.args.gradient_accumulation_steps if needs_accumulation(self.args) else None
                self.per_layer_steps = enable_per_layer_steps(self.optimizer, accumulation_steps=accumulation)
        else:
            check_per_layer_handle(unwrapped_optimizer(self.optimizer), self.args)
        return self.optimizer

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        handle = per_layer_handle(unwrapped_optimizer(self.optimizer))
        if handle is not None:
            check_per_layer_handle(unwrapped_optimizer(self.optimizer), self.args)
            return handle.clip_grad_norm_(self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """The Trainer's logged gradient norm: per-layer accumulation's norm of the update (the clipping norm), or
        None in per-layer mode without accumulation, where the gradients are gone by now."""
        handle = per_layer_handle(unwrapped_optimizer(self.optimizer))
        if handle is None:
            return super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is None and handle.accumulation_steps is not None:
            grad_norm = handle.clip_grad_norm_(float("inf"))
        return grad_norm


def needs_accumulation(args: transformers.TrainingArguments) -> bool:
    """Whether TrainingArguments need per-layer accumulation: gradient accumulation or clipping."""
    return args.gradient_accumulation_steps > 1 or bool(args.max_grad_norm and args.max_grad_norm > 0)


def check_per_layer_handle(optimizer: Any, args: transformers.TrainingArguments) -> None:
    """Raise a ValueError when a user-built optimizer's per-layer steps cannot do what TrainingArguments ask."""
    handle = per_layer_handle(optimizer)
    if handle is None or not needs_accumulation(args) or handle.accumulation_steps == args.gradient_accumulation_steps:
        return
    raise ValueError(f"per-layer steps with gradient_accumulation_steps={args.gradient_accumulation_steps} and "
                     f"max_grad_norm={args.max_grad_norm} need enable_per_layer_steps(optimizer, accumulation_steps="
                     f"{args.gradient_accumulation_steps}); this optimizer's has accumulation_steps="
                     f"{handle.accumulation_steps}")
