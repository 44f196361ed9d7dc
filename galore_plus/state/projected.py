"""The state tensors of one projected weight, from the tables: what the memory estimator counts and the checkpoint
check compares.

Every projected weight keeps two low-rank moments (:data:`~galore_plus.state.moments_8bit.MOMENT_STATE`); a
projector that stores its basis keeps it (:data:`~galore_plus.state.basis_4bit.BASIS_STATE`); a group with a sparse
residual keeps its index and moments (:data:`~galore_plus.sparse_residual.step.RESIDUAL_STATE`); the group's projector
and update rule add what they declare (their ``state``).
"""

from __future__ import annotations

from ..projectors import PROJECTORS
from ..rules import UPDATE_RULES
from ..sparse_residual.step import RESIDUAL_STATE
from .basis_4bit import BASIS_STATE
from .moments_8bit import MOMENT_STATE
from .tensors import StateTensor


def projected_state(group: dict) -> dict[str, StateTensor]:
    """Every tensor a weight of this projected group (defaults filled) may keep, by state key."""
    projector, rule = PROJECTORS[group["projector"]], UPDATE_RULES[group["update_rule"]]
    return {**(BASIS_STATE if projector.stores_basis else {}), **MOMENT_STATE, **RESIDUAL_STATE, **projector.state,
            **rule.state}
