"""4-bit storage of a projector basis through ``bitsandbytes.functional`` (``basis_bits=4``; Q-GaLore's idea).

A float32 basis B is stored as bitsandbytes' blockwise NF4 codes: two 4-bit codes per ``uint8``
plus one float32 ``absmax`` per block of :data:`BLOCKSIZE` consecutive values; a value is
``NF4[code] * absmax[block]``. The state holds only the codes and the absmax values (plain tensors);
the basis shape is known from the weight, the rank and the projected side, and the NF4 table is a
constant of bitsandbytes. The basis is quantised once per refresh and dequantised once per step;
the dequantised basis is used as it is (not re-orthonormalised). A stack of bases (E, m, r) is
quantised as one flat tensor: a block holds values of two experts when m r is not a multiple of 64.

Why NF4 with blocks of 64: basis entries are close to Gaussian, for which NF4's table is built;
on the LLaMA-2-7B q_proj shape (4096 x 4096, rank 128) it keeps 0.99 of the float32 basis's
captured energy (``python -m benchmarks.bench_projectors``), FP4 does not.

Quantisation is bitsandbytes' ``quantize_4bit``; dequantisation is a table look-up in torch (NF4
table from ``bitsandbytes.functional.get_4bit_type``), because bitsandbytes 0.50's CPU
``dequantize_4bit`` returns wrong values for some shapes: rows shorter than a block (e.g. a
(64, 32) basis at blocks of 64, (4096, 128) at blocks of 256) and tensors of fewer values than a
block. The look-up is one gather and one multiply on any device.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from ..group_keys import GroupKey, choice
from ..step.shapes import Shape, Side, basis_shape
from .tensors import StateTensor

BASIS_BITS = (32, 4)
BLOCKSIZE = 64
QUANT_TYPE = "nf4"


@functools.cache
def nf4_table(device: torch.device) -> Tensor:
    """bitsandbytes' 16 NF4 values (a code c stands for ``nf4_table[c]``) on ``device``."""
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.get_4bit_type(QUANT_TYPE, device=device)


def quantize_basis(basis: Tensor) -> tuple[Tensor, Tensor]:
    """(packed ``uint8`` NF4 codes, float32 absmax per block of 64 values) of a float32 basis."""
    import bitsandbytes.functional as bnb_functional

    codes, quant_state = bnb_functional.quantize_4bit(
        basis.float().contiguous(), blocksize=BLOCKSIZE, quant_type=QUANT_TYPE
    )
    return codes, quant_state.absmax


def dequantize_basis(codes: Tensor, absmax: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The float32 basis of ``shape`` that ``(codes, absmax)`` stand for: NF4[code] * absmax of its block."""
    numel = math.prod(shape)
    packed = codes.flatten()
    indices = torch.stack((packed >> 4, packed & 0xF), dim=1).flatten()[:numel].long()
    values = torch.nn.functional.pad(nf4_table(codes.device)[indices], (0, -numel % BLOCKSIZE))
    return values.view(-1, BLOCKSIZE).mul_(absmax.view(-1, 1)).flatten()[:numel].view(shape)


def quantized_basis_nbytes(numel: int) -> int:
    """Bytes of a 4-bit basis of ``numel`` values: half a byte per value (rounded up) plus a float32 per block."""
    return (numel + 1) // 2 + 4 * math.ceil(numel / BLOCKSIZE)


def store_basis(state: dict[str, Any], basis: Tensor, bits: int) -> Tensor:
    """Keep a new basis in ``state`` and return the basis every step until the next refresh uses.

    32 bits: ``state["projector"]`` is the basis itself. 4 bits: ``state["projector_codes"]`` and
    ``state["projector_absmax"]``, and the dequantised basis is returned, so the refresh step and
    the steps after it (also after a resume) use the same numbers. A basis of the other width left
    in the state (from a checkpoint written with another ``basis_bits``) is dropped.
    """
    if bits == 32:
        state.pop("projector_codes", None)
        state.pop("projector_absmax", None)
        state["projector"] = basis
        return basis
    state.pop("projector", None)
    state["projector_codes"], state["projector_absmax"] = quantize_basis(basis)
    return dequantize_basis(state["projector_codes"], state["projector_absmax"], tuple(basis.shape))


def stored_basis(state: dict[str, Any], shape: tuple[int, ...]) -> Tensor | None:
    """The basis in ``state`` as float32 (dequantised when stored in 4 bits), or None before the first refresh.

    ``shape`` is the basis shape (:func:`~galore_plus.step.shapes.basis_shape`).
    """
    if "projector_codes" in state:
        return dequantize_basis(state["projector_codes"], state["projector_absmax"], shape)
    return state.get("projector")


def basis_bits_problem(value: object) -> tuple[type[Exception], str] | None:
    """Why ``value`` is not a valid ``basis_bits``: not one of :data:`BASIS_BITS`, or 4 without bitsandbytes."""
    problem = choice(BASIS_BITS)(value)
    if problem is not None or value == 32:
        return problem
    try:
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        return ImportError, "4-bit bases need bitsandbytes: pip install bitsandbytes"
    return None


BASIS_BITS_KEY = {"basis_bits": GroupKey(32, basis_bits_problem)}


def _basis(shape: Shape, group: dict, side: Side) -> Shape:
    return basis_shape(shape, group["rank"], side)


def _code_count(shape: Shape, group: dict, side: Side) -> Shape:
    return ((math.prod(_basis(shape, group, side)) + 1) // 2, 1)


def _absmax_count(shape: Shape, group: dict, side: Side) -> Shape:
    return (math.ceil(math.prod(_basis(shape, group, side)) / BLOCKSIZE),)


# The state of a projector that stores its basis (``Projector.stores_basis``), in 32 or 4 bits.
BASIS_STATE: dict[str, StateTensor] = {
    "projector": StateTensor(_basis, kept=lambda group, bits, accumulation: group["basis_bits"] == 32),
    "projector_codes": StateTensor(_code_count, torch.uint8, kept=lambda group, bits, accumulation: group["basis_bits"] == 4),
    "projector_absmax": StateTensor(_absmax_count, kept=lambda group, bits, accumulation: group["basis_bits"] == 4),
}
