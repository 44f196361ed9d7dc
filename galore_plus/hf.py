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
* ``per_layer=True`` steps each parameter during backward (:mod:`galore_plus.per_layer`). The
  Trainer of transformers 5.24 computes the global gradient norm after every backward, even with
  ``max_grad_norm=0``, for its ``grad_norm`` log; in per-layer mode every gradient is already
  used and freed then, so this Trainer skips that norm (no ``grad_norm`` is logged). Clipping
  (``max_grad_norm > 0``) and gradient accumulation cannot work in per-layer mode and raise a
  ``ValueError`` at construction. The same applies to an optimizer with per-layer steps passed
  through ``optimizers=(optimizer, None)``.
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
from .per_layer import enable_per_layer_steps, per_layer_enabled


def unwrapped_optimizer(optimizer: Any) -> Any:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` wrapper (or the optimizer itself)."""
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class GaLorePlusTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains with GaLorePlusAdamW (see the module docstring).

    ``galore``: keyword arguments of :func:`galore_plus.make_param_groups` (``rank`` is required).
    ``per_layer``: step each parameter during backward; needs ``max_grad_norm=0`` and no gradient
    accumulation. ``optim_bits`` and ``seed`` go to :class:`GaLorePlusAdamW`.
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
        if per_layer:
            check_per_layer_arguments(self.args)
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
                self.per_layer_steps = enable_per_layer_steps(self.optimizer)
        elif per_layer_enabled(unwrapped_optimizer(self.optimizer)):
            check_per_layer_arguments(self.args)
        return self.optimizer

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        if per_layer_enabled(unwrapped_optimizer(self.optimizer)):
            check_per_layer_arguments(self.args)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """The Trainer's logged gradient norm; None in per-layer mode, where the gradients are gone by now."""
        if per_layer_enabled(unwrapped_optimizer(self.optimizer)):
            return None
        return super()._get_grad_norm(model, grad_norm=grad_norm)


def check_per_layer_arguments(args: transformers.TrainingArguments) -> None:
    """Raise a ValueError saying what to change when TrainingArguments need what per-layer steps cannot do."""
    if args.max_grad_norm and args.max_grad_norm > 0:
        raise ValueError(f"per-layer steps cannot clip the global gradient norm (max_grad_norm={args.max_grad_norm}): "
                         "each gradient is used and freed during backward. Set TrainingArguments(max_grad_norm=0), "
                         "or train without per_layer")
    if args.gradient_accumulation_steps > 1:
        raise ValueError(f"per-layer steps cannot accumulate gradients (gradient_accumulation_steps="
                         f"{args.gradient_accumulation_steps}): every backward steps the weights. Set "
                         "gradient_accumulation_steps=1 and raise per_device_train_batch_size, or train without "
                         "per_layer")
