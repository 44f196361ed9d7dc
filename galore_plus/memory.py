"""Memory estimator: exact bytes of parameters, gradients and GaLorePlusAdamW state, before training.

Only shapes and dtypes are read, so a model built on the meta device (no RAM for its weights)
works as well as a real one. The optimizer state counted is the steady state, after the first
step and after the residual warmup; it equals the sum of ``nbytes`` of the tensors the optimizer
allocates in ``optimizer.state``:

* plain AdamW tensor (no ``rank``): a float32 step counter plus two moments in the parameter's
  dtype, or with ``optim_bits=8`` and at least 4096 values two 8-bit moments (one byte per value
  plus a float32 absmax per 256 values);
* projected weight (m, n) at rank r: the basis (m x r or r x n) in float32, or with
  ``basis_bits=4`` half a byte per value plus a float32 per 64 values, or nothing for the
  ``random`` projector (regenerated every step); two low-rank moments (float32 or 8-bit); with
  ``residual_ratio > 0`` the residual: |I| = ceil(ratio m n) entries of two float32 moments and an
  int16/int32 column index, plus m + 1 int32 row offsets; and the tensors the group's projector and
  update rule declare (APOLLO's and Fira's limiter norm: one float32);
* a stack of E expert matrices (E, m, n) counts E times one matrix's basis, moments and norm (the
  8-bit and 4-bit codes of the stack as one tensor, a float32 absmax per block of it); a
  convolution kernel counts as the matrix (out, in kh kw).

Gradients are the parameters' dtype; in per-layer mode (:mod:`galore_plus.per_layer`) only one
parameter's gradient exists at a time, so the largest one is counted. Not counted: activations,
the temporary buffers of one step, and the allocator's rounding.

Command line: ``python -m galore_plus.memory --model llama2-7b`` (or ``--config file.json`` or
``--config checkpoint_folder``; ``--model mixtral-8x7b`` or ``qwen3-30b-a3b`` for mixture-of-experts
models, whose fused expert stacks are projected) prints the table of AdamW, AdamW 8-bit, GaLore, GaLore+, GaLore+ with
4-bit bases, APOLLO and APOLLO-Mini (rank 1; the others at ranks 128, 256 and 512), 32- and 8-bit
moments, with and without per-layer steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from .group_options import fill_projected_defaults
from .groups import make_param_groups
from .presets import APOLLO, APOLLO_MINI
from .projectors import projection_side
from .sparse_residual.index import residual_count
from .state.adamw_8bit import uses_8bit_adamw
from .state.moments_8bit import quantized_nbytes
from .state.projected import projected_state
from .state.tensors import state_bytes
from .step.shapes import stepped_shape

STEP_BYTES = 4
LIMITER_NORM_BYTES = 4
GIB = 2**30

NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "tinyllama-1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, num_local_experts=8,
                         num_experts_per_tok=2),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          vocab_size=151936, num_experts=128, num_experts_per_tok=8, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of parameters, gradients, optimizer state and per-layer accumulators; ``total`` is their sum."""

    parameters: int
    gradients: int
    optimizer_state: int
    accumulators: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.accumulators


def as_param_groups(params: Iterable[Tensor] | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups as GaLorePlusAdamW takes them: a list of tensors becomes one plain group."""
    params = list(params)
    if params and isinstance(params[0], Tensor):
        return [{"params": params}]
    return params


def projected_state_bytes(shape: tuple[int, ...], group: dict[str, Any], optim_bits: int,
                          accumulation: bool = False) -> int:
    """Bytes of the state tensors one projected weight of stepped shape ``shape``, (m, n) or a stack (E, m, n), keeps
    (defaults filled; :func:`~galore_plus.state.projected.projected_state`: basis, moments, residual and what the
    group's projector and update rule declare)."""
    side = projection_side(shape, group["proj_type"], group["projector"])
    return state_bytes(projected_state(group), shape, group, side, optim_bits, accumulation)


def channel_count(shape: tuple[int, int], side: str) -> int:
    """Channels of an (m, n) weight along the side not projected: n columns on the output side, m rows on the input side."""
    return shape[1] if side == "left" else shape[0]


def accumulator_bytes(shape: tuple[int, int], group: dict[str, Any]) -> int:
    """Per-layer accumulation's accumulator of one projected weight (:mod:`galore_plus.step.accumulate`): R's sum in
    float32, one float64 per channel (the energy outside the subspace), with a residual float32 values at I, and
    with Fira's residual the float32 norm of the terms applied. At a refresh step the replaced basis is kept until
    the boundary as well (not counted: steady state)."""
    m, n = shape
    side = projection_side(shape, group["proj_type"], group["projector"])
    low_rank_numel = group["rank"] * n if side == "left" else m * group["rank"]
    fira_bytes = LIMITER_NORM_BYTES if group["full_rank_residual"] else 0
    return (4 * low_rank_numel + 8 * channel_count(shape, side) + 4 * residual_count(group["residual_ratio"], shape)
            + fira_bytes)


def plain_state_bytes(param: Tensor, optim_bits: int) -> int:
    """Step counter and the two AdamW moments of a tensor of a group without ``rank``."""
    if optim_bits == 8 and uses_8bit_adamw(param):
        return STEP_BYTES + 2 * quantized_nbytes(param.numel())
    return STEP_BYTES + 2 * param.numel() * param.element_size()


def filled_groups(params: Iterable[Tensor] | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups, projected ones with their defaults filled (copies)."""
    groups = []
    for group in as_param_groups(params):
        filled = dict(group)
        if "rank" in filled:
            fill_projected_defaults(filled)
        groups.append(filled)
    return groups


def optimizer_state_bytes(params: Iterable[Tensor] | Iterable[dict[str, Any]], optim_bits: int = 32,
                          accumulation: bool = False) -> int:
    """Bytes of GaLorePlusAdamW's state for these parameter groups once every tensor has stepped."""
    total = 0
    for group in filled_groups(params):
        if "rank" in group:
            total += sum(projected_state_bytes(stepped_shape(p, group["transposed"]), group, optim_bits, accumulation)
                         for p in group["params"])
        else:
            total += sum(plain_state_bytes(p, optim_bits) for p in group["params"])
    return total


def accumulation_bytes(params: Iterable[Tensor] | Iterable[dict[str, Any]]) -> int:
    """Bytes of every projected weight's per-layer accumulator (:func:`accumulator_bytes`)."""
    return sum(accumulator_bytes(stepped_shape(p, group["transposed"]), group)
               for group in filled_groups(params) if "rank" in group for p in group["params"])


def unique_params(params: Iterable[Tensor] | Iterable[dict[str, Any]]) -> list[Tensor]:
    """Every parameter of the groups once (tied weights count once)."""
    seen: dict[int, Tensor] = {}
    for group in as_param_groups(params):
        for param in group["params"]:
            seen.setdefault(id(param), param)
    return list(seen.values())


def gradient_bytes(params: Iterable[Tensor] | Iterable[dict[str, Any]], per_layer: bool = False,
                   accumulation: bool = False) -> int:
    """All gradients, or in per-layer mode the largest single gradient; with per-layer ``accumulation`` every
    plain tensor's gradient (kept until the boundary) plus the largest projected weight's (freed in its hook)."""
    groups = as_param_groups(params)
    trained = [p for p in unique_params(groups) if p.requires_grad]
    if not trained:
        return 0
    if not per_layer:
        return sum(p.nbytes for p in trained)
    if not accumulation:
        return max(p.nbytes for p in trained)
    projected = {id(p) for group in groups if "rank" in group for p in group["params"]}
    return (sum(p.nbytes for p in trained if id(p) not in projected)
            + max((p.nbytes for p in trained if id(p) in projected), default=0))


def estimate_memory(
    params: Iterable[Tensor] | Iterable[dict[str, Any]], optim_bits: int = 32, per_layer: bool = False,
    accumulation: bool = False,
) -> MemoryEstimate:
    """Parameters, gradients, optimizer state and (``per_layer`` with ``accumulation``, i.e. ``accumulation_steps``
    given to ``enable_per_layer_steps``) the accumulators of training these groups with GaLorePlusAdamW."""
    groups = as_param_groups(params)
    accumulation = accumulation and per_layer
    return MemoryEstimate(
        parameters=sum(p.numel() * p.element_size() for p in unique_params(groups)),
        gradients=gradient_bytes(groups, per_layer, accumulation),
        optimizer_state=optimizer_state_bytes(groups, optim_bits, accumulation),
        accumulators=accumulation_bytes(groups) if accumulation else 0,
    )


METHODS: tuple[tuple[str, int, bool], ...] = (
    ("AdamW", 32, False),
    ("AdamW 8-bit", 8, False),
    ("GaLore", 32, True),
    ("GaLore+", 32, True),
    ("GaLore+", 8, True),
    ("GaLore+ 4-bit bases", 32, True),
    ("GaLore+ 4-bit bases", 8, True),
    ("APOLLO", 32, True),
    ("APOLLO", 8, True),
    ("APOLLO-Mini", 32, True),
    ("APOLLO-Mini", 8, True),
)
FIXED_RANKS = {"APOLLO-Mini": APOLLO_MINI["rank"]}


def method_groups(model: nn.Module, method: str, rank: int, residual_ratio: float) -> list[dict[str, Any]]:
    """Parameter groups of a method of :data:`METHODS` (APOLLO's on every linear weight, as GaLore's)."""
    if method.startswith("AdamW"):
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "GaLore":
            return make_param_groups(model, rank=rank, projector="svd", cross_head=False)
        if method == "APOLLO":
            return make_param_groups(model, rank=rank, cross_head=False, **APOLLO)
        if method == "APOLLO-Mini":
            return make_param_groups(model, cross_head=False, **APOLLO_MINI)
        if method == "GaLore+ 4-bit bases":
            return make_param_groups(model, rank=rank, residual_ratio=residual_ratio, basis_bits=4)
        return make_param_groups(model, rank=rank, residual_ratio=residual_ratio)


def memory_table(
    model: nn.Module, ranks: Iterable[int], residual_ratio: float = 0.012, budget_gib: float = 24.0
) -> list[dict[str, Any]]:
    """One row per method, bit width, rank (AdamW rows have none) and per-layer setting."""
    rows = []
    for method, bits, projected in METHODS:
        for rank in ([FIXED_RANKS[method]] if method in FIXED_RANKS else ranks) if projected else [None]:
            groups = method_groups(model, method, rank or 0, residual_ratio)
            for per_layer in (False, True):
                estimate = estimate_memory(groups, bits, per_layer)
                rows.append(dict(method=method, bits=bits, rank=rank, per_layer=per_layer, estimate=estimate,
                                 fits=estimate.total <= budget_gib * GIB))
    return rows


def format_table(rows: list[dict[str, Any]], budget_gib: float) -> str:
    """A Markdown table of :func:`memory_table` rows in GiB."""
    lines = [
        f"| method | bits | rank | per-layer | params GiB | grads GiB | optimizer state GiB | total GiB | fits {budget_gib:g} GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        estimate = row["estimate"]
        lines.append(
            f"| {row['method']} | {row['bits']} | {row['rank'] or '-'} | {'yes' if row['per_layer'] else 'no'} "
            f"| {estimate.parameters / GIB:.2f} | {estimate.gradients / GIB:.2f} | {estimate.optimizer_state / GIB:.3f} "
            f"| {estimate.total / GIB:.2f} | {'yes' if row['fits'] else 'no'} |"
        )
    return "\n".join(lines)


def load_config(model: str | None, config_path: str | None) -> Any:
    """A transformers config from a name in :data:`NAMED_CONFIGS`, a JSON file with ``model_type``, or a
    checkpoint folder holding ``config.json`` (how Hugging Face checkpoints are laid out)."""
    from transformers import AutoConfig

    if (model is None) == (config_path is None):
        raise ValueError("give exactly one of --model NAME or --config FILE.json")
    if model is not None:
        if model not in NAMED_CONFIGS:
            raise ValueError(f"unknown --model {model!r}; known: {sorted(NAMED_CONFIGS)} (or use --config FILE.json)")
        fields = dict(NAMED_CONFIGS[model])
    else:
        path = Path(config_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"--config {config_path}: no such file (give a config JSON file or a checkpoint folder "
                             "with config.json)")
        try:
            fields = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"--config {path}: not valid JSON ({error})") from None
        if not isinstance(fields, dict) or "model_type" not in fields:
            raise ValueError(f"{path}: the JSON config needs a 'model_type' key (e.g. \"llama\")")
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def build_meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The causal LM of a transformers config on the meta device (shapes only, no memory, no download)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def positive_int(text: str) -> int:
    """argparse type of ``--ranks``: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def residual_ratio_arg(text: str) -> float:
    """argparse type of ``--residual-ratio``: a number in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    """The command line; a user error (bad name, missing or malformed config) exits with status 2 and one line."""
    parser = argparse.ArgumentParser(prog="python -m galore_plus.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help=f"a built-in config name: {', '.join(NAMED_CONFIGS)} (default llama2-7b)")
    parser.add_argument("--config", help="a JSON file of transformers config fields including model_type, or a "
                                         "checkpoint folder holding config.json")
    parser.add_argument("--ranks", type=positive_int, nargs="+", default=[128, 256, 512], help="default 128 256 512")
    parser.add_argument("--residual-ratio", type=residual_ratio_arg, default=0.012, help="GaLore+ residual on q/k (default 0.012)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="parameter and gradient dtype (default bfloat16)")
    parser.add_argument("--budget-gib", type=float, default=24.0, help="memory budget for the fits column (default 24)")
    args = parser.parse_args(argv)
    if args.model is None and args.config is None:
        args.model = "llama2-7b"
    try:
        model = build_meta_model(load_config(args.model, args.config), getattr(torch, args.dtype))
    except ValueError as error:
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    count = sum(p.numel() for p in model.parameters())
    print(f"{args.model or args.config}: {count / 1e9:.2f}B parameters in {args.dtype}; residual ratio "
          f"{args.residual_ratio} on q/k for GaLore+; activations and step buffers not included")
    print(format_table(memory_table(model, args.ranks, args.residual_ratio, args.budget_gib), args.budget_gib))


if __name__ == "__main__":
    main()
