"""Shared pieces of the adapter tests: a tiny model, inputs, and each method's options and parameter count."""

import torch
from torch import nn

from galore_plus.adapters import adapter_parameters

METHODS = ["lora", "dora", "vera", "dvora", "hydra", "dylora", "adalora"]

# The options a method needs to be added at all (AdaLoRA's schedule has no defaults for these).
OPTIONS = {"adalora": {"target_rank": 1, "total_steps": 20}}

# Trainable parameters per adapted Linear(in, out) at rank r, as stated in docs/adapters.md.
PARAMETER_COUNTS = {
    "lora": lambda r, i, o: r * (i + o),
    "dora": lambda r, i, o: r * (i + o) + o,
    "vera": lambda r, i, o: r + o,
    "dvora": lambda r, i, o: r + 2 * o,
    "hydra": lambda r, i, o: r * (i + 3 * o),
    "dylora": lambda r, i, o: r * (i + o),
    "adalora": lambda r, i, o: r * (i + o + 1),
}


class TinyLM(nn.Module):
    """A small model with a nested block, same-shape layers and an output head called lm_head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.block = nn.ModuleDict(
            {"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8, bias=False), "up": nn.Linear(8, 12)}
        )
        self.down = nn.Linear(12, 8)
        self.lm_head = nn.Linear(8, 11, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.block["q_proj"](h) * torch.sigmoid(self.block["v_proj"](h))
        h = h + self.down(torch.relu(self.block["up"](h)))
        return self.lm_head(h)


def make_model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 2, scale: float = 0.5) -> None:
    """Add ``scale`` times Gaussian noise to every adapter parameter so that every branch contributes to the output."""
    generator = torch.Generator().manual_seed(seed)
    for p in adapter_parameters(model):
        p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def linear64(in_features: int, out_features: int, bias: bool = True, seed: int = 3) -> nn.Linear:
    """A float64 ``nn.Linear`` with seeded random weights, for the dense references."""
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).double()
