"""The ``"ldadam"`` update rule: GaLore's step with LDAdam's error feedback (Robert et al. 2024, arXiv:2410.16103).

LDAdam keeps a full-size buffer e of what the low-rank step did not use and adds it to the next gradient:
a_t = g_t + e_t, the subspace and the low-rank gradient are computed from a_t, and
e_{t+1} = a_t - P_t P_t^T a_t + b1 / (1 - b1) (P_{t-1} m_{t-1} - P_t m~_{t-1}) (its "generalised" error feedback:
the gradient's compression error plus the momentum lost when the subspace changes). For a weight with gradient
G (m, n), basis P (m, r) | Q (r, n) and step t, this rule is

1. A = G + E, E the buffer (``state["error_feedback"]``, zeros at the first step): every step projects A,
   R = P^T A | A Q^T, and a refresh computes the new basis from A (:class:`ErrorFeedbackLayout` is the
   gradient the step reads);
2. M, V: Adam's moments of R, N their bias-corrected direction (the ``"galore"`` rule's N);
3. p <- p (1 - lr wd) - lr scale P N | N Q (GaLore's update);
4. E <- A - P R | A - R Q: the part of A outside the subspace (kept as it was on a skipped step).

Between refreshes P^T E = 0 (E lies outside the subspace), so E does not change R: it sums the parts of the
gradients outside the subspace since the last refresh, and enters the step when a refresh turns the basis towards
them (LDAdam refreshes every step, with one power iteration).

Deviation from LDAdam: the second term of its error (the momentum lost at a change of subspace) is not
kept; only the gradient's compression error is fed back. LDAdam's first-moment map at a change of subspace,
m~ = P_t^T P_{t-1} m, is this package's ``moment_transfer`` (the r x r change of coordinates C); its
second-moment map, from the bias-corrected variance v_hat - m_hat^2 and mean, is not (``moment_transfer`` maps V by
C * C and gives a new direction the mean variance, docs/levers.md section 1).

State: the full-size float32 buffer E (float64 for a float64 weight): 4 m n bytes, as much as one of AdamW's
moments; :mod:`galore_plus.memory` counts it and the checkpoint check knows its shape. Refused: FSDP2 row shards
(raised at the step), per-layer accumulation (E needs the full gradient), ``scale="auto"``, the full-rank and
sparse residuals (keys it does not read). Works for 8-bit moments (E stays float32), stacks of matrices and
per-layer steps without accumulation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..kernels.dispatch import apply_update
from ..state.tensors import StateTensor
from ..step.apply import LowRankTerm
from ..step.row_blocks import widened_dtype
from .base import UpdateInputs, UpdateRule, require_whole_weight
from .frugal import FULL_GRADIENT_REFUSAL, check_finite_scale, outside_subspace

ERROR_KEY = "error_feedback"
ERROR_REASON = "the error buffer is kept for the whole weight"


class ErrorFeedbackLayout:
    """A weight's layout whose gradient is G + E (step 1); everything else is the wrapped layout's."""

    def __init__(self, layout, state: dict[str, Any]):
        self.inner, self.state = layout, state
        self.shape, self.device = layout.shape, layout.device
        self.corrected: Tensor | None = None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def gradient(self) -> Tensor:
        """A = G + E in float32 (float64 for a float64 gradient), computed once per step."""
        if self.corrected is None:
            grad = self.inner.gradient()
            require_whole_weight("ldadam", grad.shape, self.shape, ERROR_REASON)
            grad = grad.to(widened_dtype(grad.dtype))
            if ERROR_KEY not in self.state:
                self.state[ERROR_KEY] = torch.zeros_like(grad)
            self.corrected = grad + self.state[ERROR_KEY]
        return self.corrected

    def read_rows(self, rows: Tensor | None) -> Tensor:
        """The float32 rows ``rows`` of A (all rows when None): a refresh computes the basis from A."""
        corrected = self.gradient()
        return (corrected if rows is None else corrected.index_select(-2, rows.to(corrected.device))).float()


def error_feedback_layout(layout, state: dict[str, Any]) -> ErrorFeedbackLayout:
    """The layout a ``"ldadam"`` step reads its gradient from (``UpdateRule.gradient_source``)."""
    return ErrorFeedbackLayout(layout, state)


def ldadam_rule(inputs: UpdateInputs, state: dict[str, Any], group: dict[str, Any]) -> None:
    """Steps 3-4 on one weight (``inputs`` is an :class:`~galore_plus.rules.base.UpdateInputs` whose ``grad`` is A);
    the weight and E are left unchanged, on the device, when ``inputs.finite`` is False."""
    require_whole_weight("ldadam", inputs.weight.shape, inputs.shape, ERROR_REASON)
    apply_update(inputs.weight, group["lr"] * group["scale"], 1.0 - group["lr"] * group["weight_decay"],
                 inputs.finite, low_rank=LowRankTerm(inputs.direction, inputs.basis, inputs.side))
    error = state[ERROR_KEY]
    torch.where(inputs.finite, outside_subspace(inputs.grad, inputs.basis, inputs.low_rank, inputs.side), error,
                out=error)


LDADAM = UpdateRule(ldadam_rule, state={ERROR_KEY: StateTensor(lambda shape, group, side: shape)},
                    check_group=check_finite_scale, accumulation_refusal=FULL_GRADIENT_REFUSAL,
                    gradient_source=error_feedback_layout)
