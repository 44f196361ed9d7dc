"""Projected-group presets for the peers' methods, with the settings their authors recommend.

Use them as group keys, with ``cross_head=False`` so that query/key weights get the same rule::

    groups = make_param_groups(model, rank=256, cross_head=False, **APOLLO)
    groups = make_param_groups(model, cross_head=False, **APOLLO_MINI)

* :data:`APOLLO` (Zhu et al. 2024, arXiv:2412.05270): the ``random`` projector (nothing stored),
  channel-wise scaling, ``scale=1``, a new random basis every 200 steps; its README suggests a
  rank of about a quarter of the hidden size (GaLore's choice).
* :data:`APOLLO_MINI`: rank 1 and tensor-wise scaling, ``scale=128`` (the README's default for
  rank 1; it suggests trying larger values for larger models).

Both set APOLLO's ``eps=1e-6`` (its default) for the projected groups: gradients of a small model can
be around 1e-6, where eps decides the size of N = M / (sqrt(V) + eps) and with it the update.

``scale`` follows APOLLO's convention under ``update_rule="apollo"``: the update is multiplied by
sqrt(scale) (see :mod:`galore_plus.rules.apollo`).
"""

from __future__ import annotations

from typing import Any

APOLLO: dict[str, Any] = {
    "projector": "random", "update_rule": "apollo", "scale_type": "channel", "scale": 1.0, "update_proj_gap": 200,
    "eps": 1e-6,
}
APOLLO_MINI: dict[str, Any] = {**APOLLO, "rank": 1, "scale_type": "tensor", "scale": 128.0}
