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

Gradient accumulation and clipping: ``handle = enable_per_layer_steps(optimizer, accumulation_steps=k)``.
Then each hook of a projected weight adds the micro-batch's gradient, projected, to an accumulator
of the low-rank gradient's shape and frees the gradient (:mod:`galore_plus.step.accumulate` defines what
the full-size terms and a refresh do); plain tensors' gradients accumulate in ``.grad`` as usual. Up
to k backward passes, optionally ``handle.clip_grad_norm_(max_norm)``, then ``optimizer.step()``:
the boundary, where every weight steps once (so an LR scheduler stepped after it steps once per
update). A backward pass beyond k, or ``state_dict()`` / ``load_state_dict()`` between the backward
passes of an update, raise: checkpoints are taken at the boundary, and resume exactly from there.

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

import math
import threading
import weakref
from typing import Any, Callable

import torch
from torch import Tensor
from torch.autograd import Variable
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from .group_options import group_label
from .optimizer import GaLorePlusAdamW
from .projectors import PROJECTORS
from .rules import UPDATE_RULES
from .rules.auto_scale import AUTO
from .step.accumulate import Accumulator
from .step.layouts import is_sharded

CONSUMED_MESSAGE = (
    "per-layer mode: this parameter's gradient was consumed by its optimizer step during backward and freed. "
    "Nothing can read or accumulate into it: global gradient-norm clipping, gradient accumulation (several "
    "backward passes per optimizer.step()) and gradient logging do not work in per-layer mode without "
    "accumulation. Call optimizer.step() (or optimizer.zero_grad()) after every backward, or enable "
    "enable_per_layer_steps(optimizer, accumulation_steps=k), which accumulates in the subspace and clips with "
    "its handle's clip_grad_norm_(max_norm). Under DistributedDataParallel, accumulate with backward passes "
    "inside ddp.no_sync()."
)

_ENABLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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

    def __init__(self, optimizer: GaLorePlusAdamW, ddp_model: DistributedDataParallel | None = None,
                 accumulation_steps: int | None = None):
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.accumulators: dict[Tensor, Accumulator] = {}
        self.backward_passes = 0
        self._counted_this_backward = False
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
            hook = self._hook if accumulation_steps is None else self._accumulate_hook
            for param, (group_index, position) in self.places.items():
                self._handles.append(param.register_post_accumulate_grad_hook(hook(group_index, position)))
        else:
            ddp_model.register_comm_hook(ddp_model.process_group, self._reduce_then_step)
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))
        if accumulation_steps is not None:
            self._handles.append(optimizer.register_state_dict_pre_hook(self._refuse_mid_update))
            self._handles.append(optimizer.register_load_state_dict_pre_hook(self._refuse_mid_update))

    def _hook(self, group_index: int, position: int) -> Callable[[Tensor], None]:
        def step_now(param: Tensor) -> None:
            self.step_parameter(param, param.grad, group_index, position)
            param.grad = ConsumedGradient(param)

        return step_now

    def _accumulate_hook(self, group_index: int, position: int) -> Callable[[Tensor], None]:
        def accumulate(param: Tensor) -> None:
            self._count_backward()
            if "rank" not in self.optimizer.param_groups[group_index]:
                return  # a plain tensor's gradient accumulates in .grad as usual and is stepped by optimizer.step()
            self.accumulators[param] = self.optimizer.accumulate_parameter(
                param, group_index, position, self.accumulators.get(param), self.accumulation_steps)
            param.grad = None

        return accumulate

    def _count_backward(self) -> None:
        """Count the backward pass (at its first hook) and refuse one more than ``accumulation_steps``."""
        if self._counted_this_backward:
            return
        if self.backward_passes == self.accumulation_steps:
            raise RuntimeError(f"per-layer accumulation: backward pass {self.backward_passes + 1} since the last "
                               f"optimizer.step(), but accumulation_steps={self.accumulation_steps}. Call "
                               "optimizer.step() after every accumulation_steps backward passes (at most). This "
                               "pass's gradient may already be added to a plain tensor's .grad: redo the update")
        self.backward_passes += 1
        self._counted_this_backward = True
        Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        self._counted_this_backward = False

    def _refuse_mid_update(self, *args: Any) -> None:
        """state_dict / load_state_dict pre-hook: refused between the backward passes of one update."""
        if self.backward_passes:
            raise RuntimeError(
                f"per-layer accumulation: the optimizer holds {self.backward_passes} backward pass(es) of an update "
                "in its accumulators (and the plain tensors' .grad), which no state dict holds. Save and load "
                "checkpoints at the boundary, after optimizer.step(): resuming there is exact")

    @torch.no_grad()
    def step_accumulated(self) -> None:
        """The boundary: step every projected weight from its accumulator (called by ``optimizer.step()``)."""
        for param, accumulator in self.accumulators.items():
            self.optimizer.step_accumulated_parameter(param, *self.places[param], accumulator)
        self.accumulators.clear()
        self.backward_passes = 0

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip the accumulated gradient of this update to the 2-norm ``max_norm``; returns the norm before clipping.

        Per-layer accumulation's ``torch.nn.utils.clip_grad_norm_``: call it after the last backward pass,
        before ``optimizer.step()``. The squared norm is the sum over plain tensors of ||.grad||^2 (exact,
        float32) and over projected weights of ||R||^2 plus the accumulated energy outside the subspace
        (:meth:`galore_plus.step.accumulate.Accumulator.square_norm`; exact for one micro-batch, without the
        cross terms of the micro-batches' parts outside the subspace otherwise). Plain gradients are
        multiplied in place by min(1, max_norm / (norm + 1e-6)); projected weights' accumulated R and
        values at I are multiplied by it at the step. Nothing is read on the host. ``max_norm=inf``
        only measures.
        """
        if self.accumulation_steps is None:
            raise RuntimeError("per-layer steps without accumulation consume every gradient during backward, so "
                               "nothing is left to clip: enable_per_layer_steps(optimizer, accumulation_steps=k)")
        plain = [param.grad for param in self.params
                 if param.grad is not None and not isinstance(param.grad, ConsumedGradient)]
        squares = [torch.linalg.vector_norm(grad, dtype=torch.float32).square() for grad in plain]
        squares += [accumulator.square_norm() for accumulator in self.accumulators.values()]
        if not squares:
            return torch.zeros(())
        norm = torch.stack([square.to(squares[0].device) for square in squares]).sum().sqrt()
        if math.isinf(max_norm):
            return norm
        coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for grad in plain:
            grad.mul_(coefficient.to(grad.device, grad.dtype))
        for accumulator in self.accumulators.values():
            accumulator.scale = coefficient
        return norm

    def accumulator_bytes(self) -> int:
        """Bytes held by the accumulators now (projected weights; plain gradients are not counted)."""
        return sum(accumulator.nbytes() for accumulator in self.accumulators.values())

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
        if self.accumulation_steps is not None:
            self.step_accumulated()

    def release_consumed(self) -> None:
        """Set every consumed-gradient marker back to None."""
        for param in self.params:
            if isinstance(param.grad, ConsumedGradient):
                param.grad = None

    def remove(self) -> None:
        """Remove the hooks; the optimizer steps normally from then on."""
        if self.accumulators:
            raise RuntimeError(f"per-layer accumulation: remove() with {self.backward_passes} backward pass(es) "
                               "accumulated and not stepped; call optimizer.step() first")
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.active = False
        self.release_consumed()
        _ENABLED.pop(self.optimizer, None)


def per_layer_enabled(optimizer: Any) -> bool:
    """Whether per-layer steps are on for ``optimizer`` (its gradients are then consumed during backward)."""
    return optimizer in _ENABLED


def per_layer_handle(optimizer: Any) -> "PerLayerSteps | None":
    """The :class:`PerLayerSteps` enabled on ``optimizer``, or None."""
    handle = _ENABLED.get(optimizer)
    return handle() if handle is not None else None


def enable_per_layer_steps(
    optimizer: GaLorePlusAdamW, ddp_model: DistributedDataParallel | None = None, *,
    accumulation_steps: int | None = None,
) -> PerLayerSteps:
    """Step every parameter of ``optimizer`` as soon as its gradient is ready (see module docs).

    In a DistributedDataParallel job pass the wrapped model as ``ddp_model``: the parameters are
    then stepped from a DDP communication hook with their all-reduced gradients. It must be called
    before the first backward pass. DDP takes one communication hook per model and cannot remove it:
    after :meth:`PerLayerSteps.remove` the hook only all-reduces, and enabling per-layer steps on the
    same DDP model again raises DDP's own error. Parameters added to the optimizer later
    are stepped by ``optimizer.step()`` as usual.

    ``accumulation_steps=k`` turns on gradient accumulation (see the module docs and
    :mod:`galore_plus.step.accumulate`): up to k backward passes, then ``optimizer.step()``, the boundary.
    Groups whose keys accumulation cannot honour raise a ValueError naming the key.
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
    if accumulation_steps is not None:
        _check_accumulation(optimizer, ddp_model, accumulation_steps)
    handle = PerLayerSteps(optimizer, ddp_model, accumulation_steps)
    _ENABLED[optimizer] = weakref.ref(handle)  # the handle refers to the optimizer: a strong value would keep it alive
    return handle


def _check_accumulation(optimizer: GaLorePlusAdamW, ddp_model: DistributedDataParallel | None,
                        accumulation_steps: Any) -> None:
    """Raise unless per-layer accumulation can step every group of ``optimizer`` as :mod:`galore_plus.step.accumulate` defines."""
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
    if ddp_model is not None:
        raise ValueError("accumulation_steps: under DistributedDataParallel, accumulate with ddp.no_sync() for the "
                         "first backward passes instead (they accumulate in DDP's gradient buckets, which hold a full "
                         "copy anyway; the synchronised backward steps from the reduced sum)")
    for group_index, group in enumerate(optimizer.param_groups):
        if "rank" not in group:
            continue
        label = group_label(group, group_index)
        refusals = (
            ("rank", any(param.dim() == 3 for param in group["params"]),
             "expert stacks (3-D weights) are stepped batched, and accumulation in the subspace is written for one "
             "matrix; put the stacks in a group of their own and step without accumulation"),
            ("update_rule", UPDATE_RULES[group["update_rule"]].accumulation_refusal is not None,
             UPDATE_RULES[group["update_rule"]].accumulation_refusal),
            ("projector", PROJECTORS[group["projector"]].accumulation_refusal is not None,
             PROJECTORS[group["projector"]].accumulation_refusal),
            ("scale", group["full_rank_residual"] and group["scale"] == AUTO,
             "scale='auto' with full_rank_residual needs the summed gradient's channel norms; use a number"),
            ("residual_warmup", group["residual_ratio"] > 0 and group["residual_warmup"] == 0,
             "the sparse residual's index set would be chosen after the micro-batches needed it; use >= 1"),
        )
        for key, refused, why in refusals:
            if refused:
                raise ValueError(f"{label}, key {key!r}: not supported with per-layer accumulation "
                                 f"(accumulation_steps={accumulation_steps}): {why}")


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
