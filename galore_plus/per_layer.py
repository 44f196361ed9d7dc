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
``step`` raises, since its backward would already step every parameter.

Under DistributedDataParallel, ``enable_per_layer_steps(optimizer, ddp_model=ddp)`` registers a DDP
communication hook instead of the gradient hooks: each gradient bucket is averaged over the ranks
(the all-reduce of DDP's default hook) and, when that all-reduce completes, every parameter of the
bucket is stepped with its reduced gradient. After backward (once DDP has finished with its buckets)
the stepped gradients are replaced by the same markers. Backward passes inside ``ddp.no_sync()`` run
no communication hook, so they step nothing and accumulate as in ordinary DDP. DDP's buckets hold a
full copy of the gradients, so under DDP per-layer mode saves little memory (see docs/memory.md).
Without ``ddp_model`` a distributed job (world size > 1) is refused, because a gradient hook would
step a parameter with its local gradient before DDP reduces it; FSDP-sharded (DTensor) parameters
are refused always.
"""

import threading
import weakref
from typing import Any, Callable

import torch
from torch import Tensor
from torch.autograd import Variable
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from .distributed import is_sharded
from .group_options import group_label
from .optimizer import GaLorePlusAdamW

CONSUMED_MESSAGE = (
    "per-layer mode: this parameter's gradient was consumed by its optimizer step during backward and freed. "
    "Nothing can read or accumulate into it: global gradient-norm clipping, gradient accumulation (several "
    "backward passes per optimizer.step()) and gradient logging do not work in per-layer mode. Call "
    "optimizer.step() (or optimizer.zero_grad()) after every backward, or remove the per-layer handle. "
    "Under DistributedDataParallel, accumulate with backward passes inside ddp.no_sync()."
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

    def __init__(self, optimizer: GaLorePlusAdamW, ddp_model: DistributedDataParallel | None = None):
        self.optimizer = optimizer
        self.places: dict[Tensor, tuple[int, int]] = {
            param: (group_index, position)
            for group_index, _, position, param in optimizer.indexed_params() if param.requires_grad
        }
        self.params: list[Tensor] = list(self.places)
        self.active = True
        self._handles: list[RemovableHandle] = []
        self._stepped_in_backward: list[Tensor] = []
        self._end_of_backward_queued = False
        self._bucket_lock = threading.Lock()
        if ddp_model is None:
            for param, (group_index, position) in self.places.items():
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(group_index, position)))
        else:
            ddp_model.register_comm_hook(ddp_model.process_group, self._reduce_then_step)
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))

    def _hook(self, group_index: int, position: int) -> Callable[[Tensor], None]:
        def step_now(param: Tensor) -> None:
            self.step_parameter(param, param.grad, group_index, position)
            param.grad = ConsumedGradient(param)

        return step_now

    @torch.no_grad()
    def step_parameter(self, param: Tensor, grad: Tensor, group_index: int, position: int) -> None:
        """The ordinary step of one parameter with ``grad`` (which becomes its ``.grad``).

        The group is looked up by index at each call, because ``load_state_dict`` replaces the
        group dicts and LR schedulers change their ``lr``.
        """
        param.grad = grad
        self.optimizer.step_parameter(param, group_index, position)

    def _reduce_then_step(
        self, process_group: torch.distributed.ProcessGroup, bucket: torch.distributed.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        """DDP communication hook: average the bucket over the ranks, then step its parameters.

        The step runs in the all-reduce's completion callback (possibly on a process-group thread;
        a lock keeps bucket steps one at a time). The first bucket of a backward pass queues
        :meth:`_after_ddp_backward`. The module has no ``from __future__ import annotations``
        because DDP compares this signature's annotations with the real ``GradBucket`` and ``Future``.
        """
        if self.active and not self._end_of_backward_queued:
            Variable._execution_engine.queue_callback(self._after_ddp_backward)
            self._end_of_backward_queued = True

        def step_bucket(future: torch.futures.Future[Tensor]) -> Tensor:
            if self.active:
                with self._bucket_lock:
                    for param, grad in zip(bucket.parameters(), bucket.gradients()):
                        if param in self.places:
                            self.step_parameter(param, grad, *self.places[param])
                            self._stepped_in_backward.append(param)
            return future.value()

        return allreduce_hook(process_group, bucket).then(step_bucket)

    def _after_ddp_backward(self) -> None:
        """End-of-backward callback, queued by the first bucket; DDP may queue its own final callback
        (which writes the reduced gradients into ``.grad``) after it, so the marking is queued again
        and runs after DDP's."""
        Variable._execution_engine.queue_callback(self._consume_stepped)

    def _consume_stepped(self) -> None:
        """After DDP has written the reduced gradients: replace the stepped ones by markers."""
        for param in self._stepped_in_backward:
            param.grad = ConsumedGradient(param)
        self._stepped_in_backward.clear()
        self._end_of_backward_queued = False

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
        self.active = False
        self.release_consumed()
        _ENABLED.discard(self.optimizer)


def per_layer_enabled(optimizer: Any) -> bool:
    """Whether per-layer steps are on for ``optimizer`` (its gradients are then consumed during backward)."""
    return optimizer in _ENABLED


def enable_per_layer_steps(
    optimizer: GaLorePlusAdamW, ddp_model: DistributedDataParallel | None = None
) -> PerLayerSteps:
    """Step every parameter of ``optimizer`` as soon as its gradient is ready (see module docs).

    In a DistributedDataParallel job pass the wrapped model as ``ddp_model``: the parameters are
    then stepped from a DDP communication hook with their all-reduced gradients. It must be called
    before the first backward pass. DDP takes one communication hook per model and cannot remove it:
    after :meth:`PerLayerSteps.remove` the hook only all-reduces, and enabling per-layer steps on the
    same DDP model again raises DDP's own error. Parameters added to the optimizer later
    are stepped by ``optimizer.step()`` as usual.
    """
    if not isinstance(optimizer, GaLorePlusAdamW):
        raise TypeError(f"per-layer steps need a GaLorePlusAdamW, got {type(optimizer).__name__}")
    if optimizer in _ENABLED:
        raise RuntimeError("per-layer steps are already enabled on this optimizer (each parameter would step twice)")
    if any(is_sharded(param) for _, _, _, param in optimizer.indexed_params()):
        raise RuntimeError("per-layer steps do not support FSDP-sharded (DTensor) parameters; use optimizer.step()")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if ddp_model is None:
        if distributed and torch.distributed.get_world_size() > 1:
            raise RuntimeError("per-layer steps in a distributed job (world size > 1) need the DistributedDataParallel "
                               "model: enable_per_layer_steps(optimizer, ddp_model=ddp). Without it a gradient hook "
                               "would step each parameter with its local gradient before DDP reduces it")
    else:
        _check_ddp_model(optimizer, ddp_model)
    handle = PerLayerSteps(optimizer, ddp_model)
    _ENABLED.add(optimizer)
    return handle


def _check_ddp_model(optimizer: GaLorePlusAdamW, ddp_model: DistributedDataParallel) -> None:
    """Raise unless per-layer steps from ``ddp_model``'s buckets step every parameter of ``optimizer`` correctly."""
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError("ddp_model must be a torch.nn.parallel.DistributedDataParallel, "
                        f"got {type(ddp_model).__name__}")
    if ddp_model.find_unused_parameters:
        raise ValueError("ddp_model: per-layer steps do not support DistributedDataParallel("
                         "find_unused_parameters=True); DDP would hand the hook zeros for unused parameters "
                         "and they would be stepped")
    wrapped = {id(param) for param in ddp_model.parameters()}
    for group_index, group, _, param in optimizer.indexed_params():
        if param.requires_grad and id(param) not in wrapped:
            raise ValueError(f"{group_label(group, group_index)}, key 'params': a parameter of the optimizer is not a "
                             "parameter of ddp_model, so no DDP bucket would step it")
