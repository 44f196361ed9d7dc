"""8-bit blockwise storage of Adam moments through ``bitsandbytes.functional`` (dynamic quantisation).

A moment tensor X is stored as ``uint8`` codes of X's shape plus one float32 ``absmax`` per block
of :data:`BLOCKSIZE` consecutive values (bitsandbytes' 8-bit optimizer layout): a value is
``code_map[codes] * absmax[block]``. The first moment uses the signed dynamic map, the second
moment the unsigned one, as bitsandbytes' 8-bit Adam does. The maps are constants, rebuilt on
demand, so the state holds only the codes and the absmax values (plain tensors in the state dict).

Two uses: the low-rank moments of projected weights (:func:`load_moments` puts float32 ``exp_avg``
and ``exp_avg_sq`` into the state for the duration of one step, :func:`store_moments` turns them
back into codes at the end of the step, so everything in between is the 32-bit step), and the
moments of plain AdamW tensors (:mod:`galore_plus.state.adamw_8bit`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from ..step.shapes import Shape, Side, low_rank_shape
from .tensors import StateTensor

BLOCKSIZE = 256
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
INSTALL_HINT = "optim_bits=8 needs bitsandbytes: pip install bitsandbytes"


def require_bitsandbytes() -> None:
    """Raise ImportError with the install command when ``bitsandbytes.functional`` cannot be imported."""
    try:
        import bitsandbytes.functional  # noqa: F401
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error


@functools.cache
def dynamic_map(signed: bool, device: torch.device) -> Tensor:
    """bitsandbytes' 256-entry dynamic quantisation map (signed for M, unsigned for V) on ``device``."""
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.create_dynamic_map(signed=signed).to(device)


def moment_is_signed(key: str) -> bool:
    """The first moment is signed; the second moment (a mean of squares) is not."""
    return key == "exp_avg"


def absmax_count(numel: int) -> int:
    """Number of float32 scales of a quantised tensor of ``numel`` values."""
    return (numel + BLOCKSIZE - 1) // BLOCKSIZE


def quantized_nbytes(numel: int) -> int:
    """Bytes of one 8-bit moment: one code per value plus one float32 absmax per block."""
    return numel + 4 * absmax_count(numel)


def quantize(values: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """(uint8 codes of ``values``' shape, float32 absmax per block) of a float tensor."""
    import bitsandbytes.functional as bnb_functional

    codes, quant_state = bnb_functional.quantize_blockwise(
        values.float().contiguous(), code=dynamic_map(signed, values.device), blocksize=BLOCKSIZE
    )
    return codes, quant_state.absmax


def dequantize(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The float32 tensor that ``(codes, absmax)`` stands for."""
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_blockwise(
        codes, absmax=absmax, code=dynamic_map(signed, codes.device), blocksize=BLOCKSIZE
    )


def load_moments(state: dict[str, Any]) -> dict[str, Tensor]:
    """Replace the stored codes of the low-rank moments by float32 ``exp_avg``/``exp_avg_sq`` tensors.

    Returns the codes and absmax values taken out of the state (none before the first step, when
    the optimizer creates zero moments itself), for :func:`store_moments` to keep on a skipped step.
    """
    stored = {}
    for key in MOMENT_KEYS:
        if f"{key}_codes" in state:
            codes, absmax = state.pop(f"{key}_codes"), state.pop(f"{key}_absmax")
            stored[f"{key}_codes"], stored[f"{key}_absmax"] = codes, absmax
            state[key] = dequantize(codes, absmax, moment_is_signed(key))
    return stored


def store_moments(state: dict[str, Any], stored: dict[str, Tensor], keep_new: Tensor) -> None:
    """Replace float32 ``exp_avg``/``exp_avg_sq`` in the state by their 8-bit codes and absmax values.

    Where the 0-d bool ``keep_new`` is False, the codes ``stored`` by :func:`load_moments` are kept
    bit for bit instead (a skipped step), chosen on the device. A stack of experts (``keep_new`` of
    shape (E, 1, 1)) is quantised as one tensor: a block keeps its old codes and absmax when every
    expert with values in it skipped the step (:func:`new_blocks`). A block shared by an expert that
    stepped and one that skipped takes the new codes, which hold the skipped expert's old float32
    moments re-quantised (about unchanged; bit for bit only where blocks align with experts).
    """
    shape = state["exp_avg"].shape
    for key in MOMENT_KEYS:
        state[f"{key}_codes"], state[f"{key}_absmax"] = quantize(state.pop(key), moment_is_signed(key))
    if not stored:
        return
    block_keep, value_keep = keep_new, keep_new
    if keep_new.dim() > 0:
        block_keep = new_blocks(keep_new, shape)
        value_keep = block_keep.repeat_interleave(BLOCKSIZE)[: shape.numel()].view(shape)
    for key, old in stored.items():
        state[key] = torch.where(value_keep if key.endswith("_codes") else block_keep, state[key], old)


def new_blocks(keep_new: Tensor, shape: torch.Size) -> Tensor:
    """Per block of a quantised stack of ``shape`` (E, ...): True where some expert with values in the block has
    ``keep_new`` (E, 1, 1) True."""
    value_keep = keep_new.reshape(-1, 1).expand(shape[0], shape[1:].numel()).reshape(-1)
    padded = torch.nn.functional.pad(value_keep, (0, -value_keep.numel() % BLOCKSIZE))
    return padded.view(-1, BLOCKSIZE).any(1)


def check_loaded_moments(state: dict[str, Any], quantized: bool, where: str) -> None:
    """Raise ValueError when a loaded state holds moments of the other bit width than this optimizer uses."""
    saved_8bit = "exp_avg_codes" in state
    if ("exp_avg" in state or saved_8bit) and saved_8bit != quantized:
        saved_bits, bits = (8, 32) if saved_8bit else (32, 8)
        raise ValueError(f"{where}: the checkpoint holds {saved_bits}-bit moments but this optimizer keeps them in "
                         f"{bits} bits; construct it with optim_bits={saved_bits} to load this checkpoint")


def _moment(shape: Shape, group: dict, side: Side) -> Shape:
    return low_rank_shape(shape, group["rank"], side)


def _moment_absmax(shape: Shape, group: dict, side: Side) -> Shape:
    return (absmax_count(math.prod(_moment(shape, group, side))),)


def _kept_in(bits: int):
    return lambda group, optim_bits, accumulation: optim_bits == bits


# The two low-rank moments of every projected weight: float32, or with ``optim_bits=8`` codes and absmax (a stack's
# codes quantised as one tensor).
MOMENT_STATE: dict[str, StateTensor] = {
    **{key: StateTensor(_moment, kept=_kept_in(32)) for key in MOMENT_KEYS},
    **{f"{key}_codes": StateTensor(_moment, torch.uint8, kept=_kept_in(8)) for key in MOMENT_KEYS},
    **{f"{key}_absmax": StateTensor(_moment_absmax, kept=_kept_in(8)) for key in MOMENT_KEYS},
}
