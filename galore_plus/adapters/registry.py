"""Adapter method name -> layer class. A new method is one file with its class plus one entry here."""

from __future__ import annotations

from .adalora import AdaLoRALinear
from .base import AdapterLinear
from .dora import DoRALinear
from .dvora import DVoRALinear
from .dylora import DyLoRALinear
from .hydra import HydraLinear
from .lora import LoRALinear
from .vera import VeRALinear

ADAPTERS: dict[str, type[AdapterLinear]] = {
    "lora": LoRALinear,
    "dora": DoRALinear,
    "vera": VeRALinear,
    "dvora": DVoRALinear,
    "hydra": HydraLinear,
    "dylora": DyLoRALinear,
    "adalora": AdaLoRALinear,
}
