"""GaLorePlusAdamW: AdamW whose moments live in a low-rank subspace of each projected weight's gradient."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.optim.adam import adam

from .group_options import (
    check_hyperparameters, group_label, keyword_argument_error, plain_adamw_warning, prepare_group,
)
from .state import adamw_8bit
from .state.checkpoint import checked_state_dict
from .state.moments_8bit import require_bitsandbytes
from .step.accumulate import Accumulator
from .step.layouts import LocalLayout, RowShardLayout, is_sharded, row_shard_layout
from .step.refresh_schedule import weight_refresh_count
from .step.weight_step import (
    SkippedSteps, StepContext, accumulate_projected_gradient, step_accumulated_weight, step_projected_weight,
)


CONSTRUCTOR_ARGS = ("params", "lr", "betas", "eps", "weight_decay", "seed", "foreach", "optim_bits")


class GaLorePlusAdamW(torch.optim.Optimizer):
    """AdamW with GaLore+ low-rank projection for the parameter groups that have a ``rank`` key.

    Groups without ``rank`` are stepped by torch's own AdamW function, so they behave exactly like
    ``torch.optim.AdamW``. For a projected weight with float32 gradient G and step t (from 1):

    1. the basis is recomputed when (t - 1) % update_proj_gap == 0 (see :mod:`galore_plus.projectors`);
    2. R = P^T G or G Q^T;
    3. M, V are Adam moments of R, with bias corrections that use t (never reset at a refresh);
    4. N = (M / (1 - b1^t)) / (sqrt(V / (1 - b2^t)) + eps);
    5. p <- p (1 - lr wd) - lr scale (P N or N Q) (the update rule ``"galore"``);
    6. with ``residual_ratio`` > 0 the update at a fixed sparse index set I is replaced by an exact
       (or, with ``residual_mode="paper"``, Algorithm 2's) one; see :mod:`galore_plus.sparse_residual.values`.

    Levers (docs/levers.md): ``full_rank_residual`` (Fira's norm-scaled residual added to the
    update; on by default for the GaLore+ projectors ``randomized`` and ``cross_head``, off for
    ``svd`` and ``random``), and, off by default, ``moment_transfer`` (M, V re-expressed in the new
    basis at a refresh), ``adaptive_gap`` (a per-weight gap doubled while the subspace is stable)
    and ``scale="auto"`` (the update's per-entry RMS matched to the low-rank Adam direction's).

    The order is written once, in :mod:`galore_plus.step.weight_step`. A step whose values are not
    finite leaves that weight and its moments unchanged, decided on the device (no host read on a
    step without a refresh); a warning follows at the next refresh or ``state_dict()``.

    ``seed`` seeds every random choice of the projectors together with the parameter's position and
    the refresh count; torch's global RNG is never used.

    ``optim_bits=8`` stores the low-rank moments, and the AdamW moments of plain tensors with at
    least 4096 values, as 8-bit blockwise codes (see :mod:`galore_plus.state.moments_8bit`; needs bitsandbytes).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        seed: int = 0,
        foreach: bool | None = None,
        optim_bits: int = 32,
        **group_keys: Any,
    ):
        if group_keys:
            raise keyword_argument_error(group_keys, CONSTRUCTOR_ARGS)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)
        check_hyperparameters(defaults, "GaLorePlusAdamW(...)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if isinstance(optim_bits, bool) or optim_bits not in (32, 8):
            raise ValueError(f"optim_bits must be 32 or 8, got {optim_bits!r}")
        if optim_bits == 8:
            require_bitsandbytes()
        self.optim_bits = optim_bits
        self.seed = seed
        self._warned: set[str] = set()
        self._skipped = SkippedSteps()
        super().__init__(params, defaults)
        plain_warning = plain_adamw_warning(self.param_groups)
        if plain_warning is not None:
            warnings.warn(plain_warning, UserWarning, stacklevel=2)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as torch does (named parameters included), then validate it, filling projector defaults
        where it has ``rank``; an invalid group is taken out again before the error is raised.

        Unknown keys and invalid values raise, naming the group and key (see :mod:`galore_plus.group_options`).
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            messages = prepare_group(group, len(self.param_groups) - 1, self.defaults)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        for message in messages:
            warnings.warn(message, UserWarning, stacklevel=2)

    def __getstate__(self) -> dict[str, Any]:
        """Torch's state (defaults, state, param_groups) and what a step and ``state_dict()`` read besides:
        ``seed``, ``optim_bits``, the skipped-step counters and the warnings already given."""
        return {**super().__getstate__(), "seed": self.seed, "optim_bits": self.optim_bits,
                "_skipped": self._skipped, "_warned": self._warned}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Torch's ``__setstate__``; a plain tensor's ``step`` saved as a Python number (old torch checkpoints) becomes a
        tensor, as torch's AdamW converts it. A pickle without our attributes gets the constructor's defaults."""
        differentiable = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)
        if not differentiable:   # torch's __setstate__ adds it; GaLorePlusAdamW has no differentiable mode
            self.defaults.pop("differentiable", None)
        self.__dict__.setdefault("seed", 0)
        self.__dict__.setdefault("optim_bits", 32)
        self.__dict__.setdefault("_skipped", SkippedSteps())
        self.__dict__.setdefault("_warned", set())
        for group in self.param_groups:
            if "rank" in group:
                continue
            for param in group["params"]:
                param_state = self.state.get(param)
                if param_state and "step" in param_state and not isinstance(param_state["step"], Tensor):
                    param_state["step"] = torch.tensor(float(param_state["step"]), dtype=plain_step_dtype())

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if "rank" not in group:
                self._step_plain(group)
        for group_index, group, position, param in self.indexed_params():
            if "rank" in group and param.grad is not None:
                self._step_projected(param, group, group_index, position)
        return loss

    def indexed_params(self) -> Iterator[tuple[int, dict[str, Any], int, Tensor]]:
        """(group index, group, position in the state dict, parameter) for every parameter."""
        position = 0
        for group_index, group in enumerate(self.param_groups):
            for param in group["params"]:
                yield group_index, group, position, param
                position += 1

    def refresh_counts(self) -> dict[int, int]:
        """Basis refreshes done so far by each projected weight, keyed by its position in the state dict."""
        return {position: weight_refresh_count(self.state[param], group)
                for _, group, position, param in self.indexed_params() if "rank" in group}

    @torch.no_grad()
    def step_parameter(self, param: Tensor, group_index: int, position: int) -> None:
        """The step of one parameter with its current ``.grad``: what ``step()`` does for it.

        ``group_index`` and ``position`` are as given by :meth:`indexed_params`. Used by per-layer mode.
        """
        group = self.param_groups[group_index]
        if "rank" in group:
            self._step_projected(param, group, group_index, position)
        else:
            self._step_plain({**group, "params": [param]})

    def _step_plain(self, group: dict[str, Any]) -> None:
        """Torch's AdamW update for the parameters of a group without ``rank``."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            state = self.state[param]
            if self.optim_bits == 8 and adamw_8bit.uses_8bit_adamw(param):
                if not state:
                    adamw_8bit.init_adamw_state_8bit(state, param)
                beta1, beta2 = group["betas"]
                adamw_8bit.adamw_step_8bit(param, param.grad, state, group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
                continue
            if not state:
                state["step"] = torch.tensor(0.0, dtype=plain_step_dtype())
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            params.append(param)
            grads.append(param.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adam(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            foreach=group["foreach"],
            has_complex=any(torch.is_complex(p) for p in params),
            decoupled_weight_decay=True,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )

    @torch.no_grad()
    def accumulate_parameter(
        self, param: Tensor, group_index: int, position: int, accumulator: Accumulator | None, micro_batches: int
    ) -> Accumulator:
        """Add ``param.grad`` of a projected weight to its per-layer accumulator (:mod:`galore_plus.step.accumulate`).

        ``accumulator`` is None for the first micro-batch of an update; the returned one goes to the
        next call and then to :meth:`step_accumulated_parameter`; ``micro_batches`` is the
        accumulation steps k. Used by per-layer accumulation.
        """
        group = _number_lr(self.param_groups[group_index])
        layout, context = self._weight_layout(param, group, group_index, position)
        return accumulate_projected_gradient(layout, self.state[param], group, context, accumulator, micro_batches)

    @torch.no_grad()
    def step_accumulated_parameter(self, param: Tensor, group_index: int, position: int,
                                   accumulator: Accumulator) -> None:
        """The step of a projected weight from its accumulator (the boundary of per-layer accumulation)."""
        group = _number_lr(self.param_groups[group_index])
        layout, context = self._weight_layout(param, group, group_index, position, check_grad=False)
        step_accumulated_weight(layout, self.state[param], group, context, accumulator)

    def _weight_layout(
        self, param: Tensor, group: dict[str, Any], group_index: int, position: int, check_grad: bool = True
    ) -> tuple[LocalLayout | RowShardLayout, StepContext]:
        """The layout of a projected weight (a matrix, expert stack or convolution kernel) and the context of its
        step; checks its gradient is dense and real."""
        label = group_label(group, group_index)
        grad = param.grad
        if check_grad and (grad.is_sparse or grad.is_complex()):
            raise TypeError(f"{label}, key 'rank': projected weights need dense real gradients, "
                            f"got a {'sparse' if grad.is_sparse else 'complex'} gradient")
        if is_sharded(param):
            layout = row_shard_layout(param, group, label, self.optim_bits)
        elif param.dim() == 4 and not param.is_contiguous():
            raise TypeError(f"{label}, key 'rank': the convolution kernel of shape {tuple(param.shape)} is stepped as "
                            "the matrix (out, in kh kw), a view of a contiguous kernel, and this one is not contiguous "
                            "(channels_last?); keep the weight contiguous or put it in a group without 'rank'")
        else:
            layout = LocalLayout(param, group["transposed"])
        return layout, StepContext(self.seed, position, self.optim_bits, label, self._warn_once, self._skipped)

    def _step_projected(self, param: Tensor, group: dict[str, Any], group_index: int, position: int) -> None:
        """One GaLore+ step of a matrix, expert stack or convolution kernel (see :mod:`galore_plus.step.weight_step`), in
        its layout."""
        group = _number_lr(group)
        layout, context = self._weight_layout(param, group, group_index, position)
        step_projected_weight(layout, self.state[param], group, context)

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    def state_dict(self) -> dict[str, Any]:
        """Torch's state dict; first warns if projected weights' steps were skipped since the last refresh."""
        self._skipped.report(self._warn_once)
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like torch after checking the checkpoint fits (:mod:`galore_plus.state.checkpoint`), keeping
        projected weights' state and 8-bit moments as saved.

        A foreign checkpoint (galore_torch), another rank or other shapes raise before anything is
        changed. The load_state_dict pre-hooks run before that check and the post-hooks after the state is
        restored, each once, as torch orders them. As in torch, the saved state of the i-th saved id (in the saved groups' order) goes to the
        i-th parameter, whatever the ids are. ``torch.optim.Optimizer.load_state_dict`` casts every tensor of
        a floating-point parameter's state to the parameter's dtype: that would round the float32 basis and
        moments of a bfloat16 weight and turn the residual's index and 8-bit codes into floats, so those
        states are copied back as saved (dtype kept, on the parameter's device).
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        state_dict = checked_state_dict(self, state_dict)
        pre_hooks, post_hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = OrderedDict(), OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre_hooks, post_hooks
        saved_ids = (saved_id for group in state_dict["param_groups"] for saved_id in group["params"])
        for (_, group, _, param), saved_id in zip(self.indexed_params(), saved_ids):
            saved = state_dict["state"].get(saved_id)
            if saved is not None and ("rank" in group or (self.optim_bits == 8 and adamw_8bit.uses_8bit_adamw(param))):
                for key, value in saved.items():
                    if isinstance(value, Tensor):
                        self.state[param][key] = value.to(device=param.device, copy=True)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def plain_step_dtype() -> torch.dtype:
    """The dtype of a plain tensor's ``step`` counter: torch's AdamW's (float64 under a float64 default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _number_lr(group: dict[str, Any]) -> dict[str, Any]:
    """``group`` with a one-element tensor lr read as a number, as torch's AdamW reads it without ``capturable``."""
    return {**group, "lr": float(group["lr"])} if isinstance(group["lr"], Tensor) else group
