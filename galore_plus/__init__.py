"""galore-plus: GaLore+ low-rank AdamW for memory-efficient training of large transformers."""

from .groups import make_param_groups
from .optimizer import GaLorePlusAdamW
from .presets import APOLLO, APOLLO_MINI

__all__ = ["APOLLO", "APOLLO_MINI", "GaLorePlusAdamW", "make_param_groups"]
__version__ = "0.1.0"
