"""Parameter-group keys as the table entries declare them: a default and the values the key takes.

A projector (:class:`galore_plus.projectors.base.Projector`) and an update rule
(:class:`galore_plus.rules.base.UpdateRule`) each list the group keys they read as
``{name: GroupKey}``; :mod:`galore_plus.group_options` fills the defaults and runs the checks from those
tables, and refuses a key that the group's projector and rule do not read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable

Problem = tuple[type[Exception], str] | None
Check = Callable[[Any], Problem]
# fail(key, message, error=ValueError) raises naming the parameter group and the key.
Fail = Callable[..., None]
# An entry's checks across its keys, check(group, fail), and of one weight, check(group, shape, where, fail).
GroupCheck = Callable[[dict, Fail], None]
WeightCheck = Callable[[dict, tuple[int, ...], str, Fail], None]


def anything(value: Any) -> Problem:
    """Every value is accepted."""
    return None


def no_check(*args: Any) -> None:
    """An entry without checks beyond its keys' own."""


@dataclass(frozen=True)
class GroupKey:
    """One group key: its default, and ``check(value)``, why a value is invalid (error type and message) or None.

    ``unset_when_none``: a value of None means "not set" and takes the group's default (a key whose values are
    never None; others keep None as a value of its own, e.g. ``norm_growth_limit=None`` disables the limiter).
    """

    default: Any
    check: Check = anything
    unset_when_none: bool = False


def integer(minimum: int) -> Check:
    """An int (not a bool) >= ``minimum``."""
    def check(value: Any) -> Problem:
        if isinstance(value, bool) or not isinstance(value, int):
            return TypeError, f"must be an int, got {value!r}"
        if value < minimum:
            return ValueError, f"must be >= {minimum}, got {value}"
        return None
    return check


def optional(check: Check) -> Check:
    """None, or a value ``check`` accepts."""
    return lambda value: None if value is None else check(value)


def choice(choices: tuple[Any, ...]) -> Check:
    """One of ``choices`` (a bool never counts as 1 or 0)."""
    def check(value: Any) -> Problem:
        if isinstance(value, bool) or value not in choices:
            return ValueError, f"must be one of {choices}, got {value!r}"
        return None
    return check


def boolean(value: Any) -> Problem:
    """True or False."""
    return None if isinstance(value, bool) else (TypeError, f"must be a bool, got {value!r}")


def finite_number(value: Any) -> Problem:
    """A finite real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        return TypeError, f"must be a finite number, got {value!r}"
    return None


def number_in(low: float, high: float, low_open: bool, high_open: bool) -> Check:
    """A finite number in the interval from ``low`` to ``high``, each end open or closed."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(value: Any) -> Problem:
        problem = finite_number(value)
        if problem is not None:
            return problem
        if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
            return ValueError, f"must be in {interval}, got {value!r}"
        return None
    return check
