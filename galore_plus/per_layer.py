"""Per-layer steps: each parameter is stepped as soon as its gradient is ready, and that gradient freed.

``enable_per_layer_steps(optimizer)`` registers a ``register_post_accumulate_grad_hook`` on every
parameter of a :class:`~galore_plus.GaLorePlusAdamW`. During ``loss.backward()`` each hook runs the
ordinary step of its parameter (the same code as ``optimizer.step()``, reading the group's current
``lr``, so LR schedulers keep working) and then replaces the gradient by a :class:`ConsumedGradient`
marker that owns no memory. Full gradients of the whole model therefore never coexist.

The marker makes misuse loud instead of silent: any operation on a consumed gradient raises
``RuntimeError``. That catches global gradient-norm clipping (``clip_grad_norm_`` reads every
gradient after backward) and gradient accumulation (a second backward before ``optimizer.step()``
adds into the marker). ``optimizer.step()`` stays part of the loop: it steps nothing (the hooks did)
and resets the markers to ``None``, as does ``optimizer.zero_grad()``. A closure passed to
``step`` raises, since its backward would already step every parameter. Per-layer mode is
single-process: enabling it in a distributed job (world size > 1) or on FSDP-sharded (DTensor)
parameters raises, because a hook would step a parameter with its local gradient before DDP or
FSDP reduce it.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .distributed import is_sharded
from .optimizer import GaLorePlusAdamW

CONSUMED_MESSAGE = (
    "per-layer mode: this parameter's gradient was consumed by its optimizer step during backward and freed. "
    "Nothing can read or accumulate into it: global gradient-norm clipping, gradient accumulation (several "
    "backward passes per optimizer.step()) and gradient logging do not work in per-layer mode. Call "
    "optimizer.step() (or optimizer.zero_grad()) after every backward, or remove the per-layer handle."
)

_ENABLED: weakref.WeakSet = weakref.WeakSet()


class ConsumedGradient(Tensor):
    """Stands in for a gradient already used by its per-layer step: no storage, every operation raises."""

    @staticmethod
    def __new__(cls, param: Tensor) -> "ConsumedGradient":
        return Tensor._make_wrapper_subclass(cls, param.shape, dtype=param.dtype, device=param.device)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        raise RuntimeError(f"{CONSUMED_MESSAGE} (operation: {func})")

    def __repr__(self) -> str:
        return "ConsumedGradient()"


class PerLayerSteps:
    """The hooks of per-layer mode on one optimizer; :meth:`remove` turns the mode off."""

    def __init__(self, optimizer: GaLorePlusAdamW):
        self.optimizer = optimizer
        self.params: list[Tensor] = []
        self._handles: list[RemovableHandle] = []
        for group_index, _, position, param in optimizer._indexed_params():
            if param.requires_grad:
                self.params.append(param)
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(group_index, position)))
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))

    def _hook(self, group_index: int, position: int) -> Callable[[Tensor], None]:
        def step_now(param: Tensor) -> None:
            self.step_parameter(param, group_index, position)

        return step_now

    @torch.no_grad()
    def step_parameter(self, param: Tensor, group_index: int, position: int) -> None:
        """The ordinary step of one parameter with its gradient, then free that gradient.

        The group is looked up by index at each call, because ``load_state_dict`` replaces the
        group dicts and LR schedulers change their ``lr``.
        """
        group = self.optimizer.param_groups[group_index]
        if "rank" in group:
            self.optimizer._step_projected(param, group, group_index, position)
        else:
            self.optimizer._step_plain({**group, "params": [param]})
        param.grad = ConsumedGradient(param)

    def _before_step(self, optimizer: GaLorePlusAdamW, args: tuple, kwargs: dict) -> None:
        """Step pre-hook; ``args`` is (optimizer, closure?) as passed to ``step``."""
        if any(arg is not None for arg in args[1:]) or kwargs.get("closure") is not None:
            raise RuntimeError("per-layer mode: optimizer.step(closure) is not supported; the backward pass "
                               "already steps every parameter, call loss.backward() and then optimizer.step()")
        self.release_consumed()

    def release_consumed(self) -> None:
        """Set every consumed-gradient marker back to None."""
        for param in self.params:
            if isinstance(param.grad, ConsumedGradient):
                param.grad = None

    def remove(self) -> None:
        """Remove the hooks; the optimizer steps normally from then on."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.release_consumed()
        _ENABLED.discard(self.optimizer)


def enable_per_layer_steps(optimizer: GaLorePlusAdamW) -> PerLayerSteps:
    """Step every parameter of ``optimizer`` from its gradient hook during backward (see module docs).

    Parameters added to the optimizer later are stepped by ``optimizer.step()`` as usual.
    """
    if not isinstance(optimizer, GaLorePlusAdamW):
        raise TypeError(f"per-layer steps need a GaLorePlusAdamW, got {type(optimizer).__name__}")
    if optimizer in _ENABLED:
        raise RuntimeError("per-layer steps are already enabled on this optimizer (each parameter would step twice)")
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise RuntimeError("per-layer steps are single-process only: a gradient hook would step each parameter with "
                           "its local gradient before DDP/FSDP reduce it across processes")
    if any(is_sharded(param) for _, _, _, param in optimizer._indexed_params()):
        raise RuntimeError("per-layer steps do not support FSDP-sharded (DTensor) parameters; use optimizer.step()")
    handle = PerLayerSteps(optimizer)
    _ENABLED.add(optimizer)
    return handle
