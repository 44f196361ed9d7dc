"""Resident memory of this process and of the machine, from Linux's /proc (bytes)."""

from __future__ import annotations

import re

GIB = 2**30


def _kib_field(path: str, field: str) -> int:
    """A ``Field:   123 kB`` line of a /proc file, in bytes."""
    with open(path) as handle:
        match = re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{path} has no {field} line (not Linux?)")
    return int(match.group(1)) * 1024


def resident_bytes() -> int:
    """Current resident set size (VmRSS) of this process."""
    return _kib_field("/proc/self/status", "VmRSS")


def peak_resident_bytes() -> int:
    """Peak resident set size (VmHWM) of this process since start or since the last :func:`reset_peak_resident`."""
    return _kib_field("/proc/self/status", "VmHWM")


def reset_peak_resident() -> bool:
    """Reset VmHWM to the current resident size (``echo 5 > /proc/self/clear_refs``); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def machine_memory_bytes() -> tuple[int, int]:
    """(MemTotal, MemAvailable) of the machine."""
    return _kib_field("/proc/meminfo", "MemTotal"), _kib_field("/proc/meminfo", "MemAvailable")
