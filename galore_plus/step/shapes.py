"""The shapes a projected step works with: the projected side, and the stepped shape of a weight."""

from __future__ import annotations

from typing import Literal

Side = Literal["left", "right"]
Shape = tuple[int, ...]  # (m, n), or (E, m, n) for a stack of E matrices
