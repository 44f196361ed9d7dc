"""Weight-side low-rank adapters for side-by-side comparison with GaLore+: LoRA, DoRA, VeRA, DVoRA, Hydra,
DyLoRA and AdaLoRA, one file per method (as ``peft``'s ``tuners/<method>/``) on the shared base in ``base.py``.

Each adapter wraps a frozen ``nn.Linear``; ``registry.ADAPTERS`` maps a method's name to its class and
``add_adapters(model, method, ...)`` puts adapters in place. The formulas are in docs/adapters.md.
Only torch is needed; ``peft`` is used solely by the parity tests.
"""

from .adalora import AdaLoRALinear, AdaLoRASchedule
from .base import AdapterLinear
from .dora import DoRALinear
from .dvora import DVoRALinear
from .dylora import DyLoRALinear, DyLoRARankSampler, set_adapter_rank
from .hydra import HydraLinear
from .lora import LoRALinear
from .model import (
    adapter_loss,
    adapter_parameters,
    adapter_step,
    adapter_training_state,
    add_adapters,
    merge_adapters,
)
from .registry import ADAPTERS
from .vera import VeRALinear, VeRAProjections

__all__ = [
    "ADAPTERS",
    "AdapterLinear",
    "LoRALinear",
    "DoRALinear",
    "VeRALinear",
    "VeRAProjections",
    "DVoRALinear",
    "HydraLinear",
    "DyLoRALinear",
    "DyLoRARankSampler",
    "AdaLoRALinear",
    "AdaLoRASchedule",
    "add_adapters",
    "merge_adapters",
    "adapter_parameters",
    "adapter_loss",
    "adapter_step",
    "adapter_training_state",
    "set_adapter_rank",
]
