"""8-bit blockwise storage of Adam moments through ``bitsandbytes.functional`` (dynamic quantisation).

A moment tensor X is stored as ``uint8`` codes of X's shape plus one float32 ``absmax`` per block
of :data:`BLOCKSIZE` consecutive values (bitsandbytes' 8-bit optimizer layout): a value is
``code_map[codes] * absmax[block]``. The first moment uses the signed dynamic map, the second
moment the unsigned one, as bitsandbytes' 8-bit Adam does. The maps are constants, rebuilt on
demand, so the state holds only the codes and the absmax values (plain tensors in the state dict).

Two uses:

* low-rank moments of projected weights: :func:`load_moments` puts float32 ``exp_avg`` and
  ``exp_avg_sq`` into the state for the duration of one step, :func:`store_moments` turns them
  back into codes at the end of the step, so everything in between is the 32-bit step;
* moments of plain AdamW tensors with at least :data:`MIN_8BIT_SIZE` values:
  :func:`adamw_step_8bit` runs bitsandbytes' own blockwise 8-bit AdamW update, on the CPU in chunks
  of :data:`CHUNK_VALUES` consecutive values (whole blocks), so that its float32 temporaries stay
  small: bitsandbytes' CPU backend dequantises its whole input, about 24 bytes of float32
  temporaries per value (2.9 GiB for a 32000 x 4096 embedding), where a chunk needs about 100 MiB.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import torch
from torch import Tensor

BLOCKSIZE = 256
MIN_8BIT_SIZE = 4096
CHUNK_VALUES = 1 << 22  # values per chunk of the CPU 8-bit AdamW step: 16384 whole blocks
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


def uses_8bit_adamw(param: Tensor) -> bool:
    """Whether a plain AdamW tensor gets 8-bit moments (bitsandbytes' rule: at least 4096 values)."""
    return param.numel() >= MIN_8BIT_SIZE


def init_adamw_state_8bit(state: dict[str, Any], param: Tensor) -> None:
    """Zero 8-bit moments (codes and absmax) and a float32 step counter for a plain AdamW tensor."""
    blocks = absmax_count(param.numel())
    state["step"] = torch.tensor(0.0)
    for key in MOMENT_KEYS:
        state[f"{key}_codes"] = torch.zeros(param.shape, dtype=torch.uint8, device=param.device)
        state[f"{key}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=param.device)


def blockwise_chunks(
    values: list[Tensor], absmax: list[Tensor], chunk_values: int
) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """Views of consecutive chunks of at most ``chunk_values`` values of the contiguous, same-size tensors
    ``values``, with the views of those chunks' blocks in ``absmax``; every chunk starts at a block boundary."""
    if chunk_values <= 0 or chunk_values % BLOCKSIZE:
        raise ValueError(f"chunk_values must be a positive multiple of {BLOCKSIZE}, got {chunk_values}")
    flat = [tensor.view(-1) for tensor in values]
    numel = flat[0].numel()
    for start in range(0, numel, chunk_values):
        end = min(start + chunk_values, numel)
        blocks = slice(start // BLOCKSIZE, absmax_count(end))
        yield [tensor[start:end] for tensor in flat], [scales[blocks] for scales in absmax]


def adamw_step_8bit(
    param: Tensor, grad: Tensor, state: dict[str, Any], lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, chunk_values: int | None = None,
) -> None:
    """One AdamW step of ``param`` with 8-bit blockwise moments, by bitsandbytes' fused update.

    Same update as ``torch.optim.AdamW`` (decoupled weight decay first), computed in float32 from
    the dequantised moments, which are then re-quantised in place. On the CPU a contiguous
    ``param`` is stepped in chunks of ``chunk_values`` (default :data:`CHUNK_VALUES`) consecutive values, each a call of the same
    update on whole blocks: the update is elementwise and the quantisation blockwise, so the result
    is bit for bit that of one call on the whole tensor (tests/test_quant.py checks it).
    """
    import bitsandbytes.functional as bnb_functional

    state["step"] += 1
    step = int(state["step"].item())
    values = [param, grad.contiguous(), state["exp_avg_codes"], state["exp_avg_sq_codes"]]
    absmax = [state["exp_avg_absmax"], state["exp_avg_sq_absmax"]]
    whole = param.device.type != "cpu" or not param.is_contiguous()
    for (param_part, grad_part, exp_avg_codes, exp_avg_sq_codes), (exp_avg_absmax, exp_avg_sq_absmax) in (
        [(values, absmax)] if whole else blockwise_chunks(values, absmax, CHUNK_VALUES if chunk_values is None else chunk_values)
    ):
        bnb_functional.optimizer_update_8bit_blockwise(
            "adam", grad_part, param_part, exp_avg_codes, exp_avg_sq_codes,
            beta1, beta2, 0.0, 0.0, eps, step, lr,
            dynamic_map(True, param.device), dynamic_map(False, param.device),
            exp_avg_absmax, exp_avg_sq_absmax, weight_decay=weight_decay,
        )
