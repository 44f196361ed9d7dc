"""Update rules: how a weight is changed from its low-rank Adam direction (a group's ``update_rule`` key).

A rule is an :class:`UpdateRule`: the Adam direction N it reads, and a function
``apply(inputs, state, group) -> None`` that writes ``inputs.weight`` in place.
``apply`` sees everything one weight's step has computed (:class:`~galore_plus.rules.base.UpdateInputs`, all local to this
process's rows of a sharded weight), the weight's optimizer state (a rule may keep tensors or
plain values of its own there; they are checkpointed with the rest) and the parameter group.
It must leave the weight unchanged when ``inputs.finite`` (a 0-d bool tensor on the device)
is False, without reading it on the host (``torch.where`` on the device: the step must not
synchronise), and must never write a non-finite value.

* ``"galore"``: p <- p (1 - lr wd) - lr scale (P N | N Q), one ``addmm_`` per block of rows
  (see :mod:`galore_plus.step.apply`);
  with the group key ``full_rank_residual``, p <- p (1 - lr wd) - lr (scale P N + S), Fira's
  norm-scaled residual S (:mod:`galore_plus.rules.fira`, the limiter's norm kept as
  ``state["residual_norm"]``);
  ``scale="auto"`` resolves as in :mod:`galore_plus.rules.auto_scale`.
  N is Adam's bias-corrected direction (:func:`galore_plus.kernels.dispatch.lowrank_adam_direction`).
* ``"apollo"``: the gradient scaled per channel or per tensor by ||N|| / ||R||, norm-growth limited
  (APOLLO; :mod:`galore_plus.rules.apollo`, group key ``scale_type``; ``scale`` enters as its square root;
  APOLLO's limiter is fixed at 1.01 and the sparse residual is not implemented with it).
  N = M / (sqrt(V) + eps), without bias correction (:func:`galore_plus.rules.apollo.apollo_moments_direction`).
* ``"muon"``: Muon's Newton-Schulz-orthogonalised step of P N + (G - P R), N the Nesterov momentum of R
  (:mod:`galore_plus.rules.muon`; ``betas[0]`` is the momentum).
* ``"frugal"``: FRUGAL, scale P N plus a state-free signSGD step of the rest, free_lr_ratio sign(G - P R)
  (:mod:`galore_plus.rules.frugal`, group key ``free_lr_ratio``).
* ``"ldadam"``: GaLore's update with LDAdam's error feedback: the step projects G + E, and E <- (G + E) - P R, a
  full-size buffer (:mod:`galore_plus.rules.ldadam`).
* ``"scale"``: SCALE's column-normalised step of P N + (G - P R), N the bias-corrected momentum of R
  (:mod:`galore_plus.rules.scale`; ``betas[0]`` is the momentum).
"""

from __future__ import annotations

from .apollo import APOLLO_RULE
from .base import UpdateRule
from .frugal import FRUGAL
from .galore import GALORE
from .ldadam import LDADAM
from .muon import MUON
from .scale import SCALE

UPDATE_RULES: dict[str, UpdateRule] = {"galore": GALORE, "apollo": APOLLO_RULE, "muon": MUON, "frugal": FRUGAL,
                                        "ldadam": LDADAM, "scale": SCALE}
# The update rule of a group that names none.
DEFAULT_UPDATE_RULE = "galore"
