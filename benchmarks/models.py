"""The small decoders of the benchmark (random init, byte-level vocabulary): LLaMA-architecture, and one
mixture-of-experts size (Mixtral architecture, experts fused as 3-D stacks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .text_data import PAD_TOKEN, VOCAB_SIZE

# hidden size, layers, attention heads, MLP size (of each expert, for the sizes in MOE_SIZES)
MODEL_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (32, 1, 2, 64),
    "mini": (48, 2, 4, 128),  # 80 k parameters: 20 tokens per parameter in 783 steps of 16 x 128 bytes
    "slim": (64, 4, 4, 176),  # 234 k parameters
    "small": (128, 4, 4, 352),
    "base": (256, 4, 8, 688),
    "base2": (256, 2, 8, 512),  # 2 layers of hidden 256: benchmarks.bench_residual's q/k gradients
    "large": (512, 8, 8, 1376),
    "moe": (48, 2, 4, 64),  # 192 k parameters, 77 % of them in the expert stacks (8 x 128 x 48 and 8 x 48 x 64)
}
# Mixture-of-experts sizes: experts per layer, experts per token (a MixtralForCausalLM, no router auxiliary loss)
MOE_SIZES: dict[str, tuple[int, int]] = {"moe": (8, 2)}


def llama_config(size: str, max_positions: int):
    """A ``transformers.LlamaConfig`` for one of :data:`MODEL_SIZES`."""
    from transformers import LlamaConfig

    hidden, layers, heads, intermediate = MODEL_SIZES[size]
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        pad_token_id=PAD_TOKEN, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
    )


def mixtral_config(size: str, max_positions: int):
    """A ``transformers.MixtralConfig`` for one of :data:`MOE_SIZES`: each layer's experts are two 3-D parameters."""
    from transformers import MixtralConfig

    hidden, layers, heads, intermediate = MODEL_SIZES[size]
    experts, per_token = MOE_SIZES[size]
    return MixtralConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        num_local_experts=experts, num_experts_per_tok=per_token, pad_token_id=PAD_TOKEN, bos_token_id=None,
        eos_token_id=None, tie_word_embeddings=False,
    )


def build_model(size: str, max_positions: int, seed: int) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (``MixtralForCausalLM`` for :data:`MOE_SIZES`) of the given size
    (float32, CPU)."""
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    torch.manual_seed(seed)
    if size in MOE_SIZES:
        return MixtralForCausalLM(mixtral_config(size, max_positions))
    return LlamaForCausalLM(llama_config(size, max_positions))


def max_rank(size: str) -> int:
    """The largest rank every projected or adapted linear weight of the model allows: its smallest side."""
    hidden, _, _, intermediate = MODEL_SIZES[size]
    return min(hidden, intermediate)


def next_byte_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """Mean cross-entropy (nats per byte) of predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]``."""
    logits = model(input_ids=tokens[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_loss(model: nn.Module, windows: Tensor, batch_size: int) -> float:
    """Mean next-byte loss over all held-out windows (equal-length windows, so a mean of batch means)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start: start + batch_size]
        total += next_byte_loss(model, batch).item() * batch.shape[0]
    model.train(was_training)
    return total / windows.shape[0]
