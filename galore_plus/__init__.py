"""galore-plus: GaLore+ low-rank AdamW for memory-efficient training of large transformers."""

from .groups import make_param_groups
from .optimizer import GaLorePlusAdamW

__all__ = ["GaLorePlusAdamW", "make_param_groups"]
__version__ = "0.1.0"
