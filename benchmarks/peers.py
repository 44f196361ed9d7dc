"""The peer packages' optimizers, built from galore_plus-style parameter groups: the one place that knows each
package's group format (used by the main job's method table and by the step-time benchmarks).

A projected group (one with ``rank``) gives a peer group of its ``params``, ``rank``, ``update_proj_gap`` and
``scale`` (under the name the package uses) plus the package's own keys; a plain group gives its ``params`` only.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

# APOLLO's and APOLLO-Mini's recommended settings in apollo_torch's keys
APOLLO_SCALING = {"scale_type": "channel", "scale": 1.0}
APOLLO_MINI_SCALING = {"rank": 1, "scale_type": "tensor", "scale": 128.0}


def peer_groups(groups: list[dict[str, Any]], scale_key: str = "scale", **keys: Any) -> list[dict[str, Any]]:
    """``groups`` in a peer package's format: projected groups with ``scale`` named ``scale_key`` plus ``keys``."""
    return [{"params": group["params"], "rank": group["rank"], "update_proj_gap": group["update_proj_gap"],
             scale_key: group["scale"], **keys} if "rank" in group else {"params": group["params"]}
            for group in groups]


def galore_torch_adamw(groups: list[dict[str, Any]], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``galore_torch.GaLoreAdamW`` with ``proj_type="std"`` (its own eps, 1e-6)."""
    from galore_torch import GaLoreAdamW

    return GaLoreAdamW(peer_groups(groups, proj_type="std"), lr=lr, weight_decay=weight_decay)


def fira_adamw(groups: list[dict[str, Any]], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``fira.FiraAdamW``: Fira's ``alpha`` is our ``scale``, ``proj_type="std"``, its own eps (1e-6)."""
    from fira import FiraAdamW

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers-style AdamW deprecation notice
        return FiraAdamW(peer_groups(groups, scale_key="alpha", proj_type="std"), lr=lr, weight_decay=weight_decay,
                         no_deprecation_warning=True)


def apollo_torch_adamw(groups: list[dict[str, Any]], lr: float, weight_decay: float = 0.0,
                       **scaling: Any) -> torch.optim.Optimizer:
    """``apollo_torch.APOLLOAdamW`` with random projections and ``scaling`` (``scale_type``, ``scale``, optionally
    ``rank``) in every projected group; its own eps (1e-6) and norm-growth limiter. apollo_torch seeds its
    projections from parameter positions, not from torch's RNG."""
    from apollo_torch import APOLLOAdamW

    return APOLLOAdamW(peer_groups(groups, proj="random", proj_type="std", **scaling), lr=lr, weight_decay=weight_decay)
