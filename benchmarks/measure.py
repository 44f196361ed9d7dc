"""What the benchmarks measure besides loss: wall time of calls, bytes of tensors, and the time spent refreshing
projectors. Every benchmark times with :func:`timed` (or its two summaries) and counts bytes with :func:`tensor_bytes`."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from galore_plus.adapters import adapter_training_state


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock timings are honest (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], calls: int = 1, device: torch.device = torch.device("cpu")) -> tuple[float, Any]:
    """(wall seconds of ``calls`` successive calls of ``function``, the last call's result); on CUDA the queued work
    is waited for before the first call and after the last."""
    synchronize(device)
    start = time.perf_counter()
    result = None
    for _ in range(calls):
        result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def mean_seconds(function: Callable[[], Any], calls: int, device: torch.device = torch.device("cpu")) -> float:
    """Mean wall time of ``calls`` successive calls, timed as one window (:func:`timed`)."""
    return timed(function, calls, device)[0] / calls


def best_seconds(function: Callable[[], Any], repeats: int,
                 device: torch.device = torch.device("cpu")) -> tuple[float, Any]:
    """(fastest of ``repeats`` separately timed calls, the last result): the call least disturbed by other load."""
    best, result = float("inf"), None
    for _ in range(repeats):
        seconds, result = timed(function, 1, device)
        best = min(best, seconds)
    return best, result


def tensor_bytes(value: Any, seen: set[int] | None = None) -> int:
    """Bytes of every distinct tensor reachable from ``value`` (dicts, lists, tuples, object attributes).

    Objects are followed through their ``__dict__``, so state held in helper objects (e.g.
    ``galore_torch``'s projector objects) is counted too; each tensor's storage counts once.
    """
    seen = set() if seen is None else seen
    if isinstance(value, Tensor):
        key = value.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return value.untyped_storage().nbytes()
    if isinstance(value, dict):
        return sum(tensor_bytes(item, seen) for item in value.values())
    if isinstance(value, (list, tuple, set)):
        return sum(tensor_bytes(item, seen) for item in value)
    if hasattr(value, "__dict__") and not isinstance(value, (type, nn.Module)) and id(value) not in seen:
        seen.add(id(value))
        return tensor_bytes(vars(value), seen)
    return 0


def training_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, of existing gradients and of the training state, right now: the optimizer's, plus what
    adapters keep for training (AdaLoRA's importance averages)."""
    params = list(model.parameters())
    return {
        "params": sum(p.nbytes for p in params),
        "grads": sum(p.grad.nbytes for p in params if p.grad is not None),
        "state": tensor_bytes([list(optimizer.state.values()), adapter_training_state(model)]),
    }


class RefreshTimer:
    """Accumulated seconds spent in projector refreshes while :meth:`patched` is active.

    Wraps, for the duration of the context, ``galore_plus``'s ``compute_basis`` wherever a
    ``galore_plus`` module imported it, ``galore_torch``'s ``GaLoreProjector.get_orthogonal_matrix`` and
    ``fira``'s ``GradientProjector.get_orthogonal_matrix``.
    The optimizer code itself is not changed.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self.calls = 0

    def _timed(self, function: Callable) -> Callable:
        def timed_call(*args, **kwargs):
            seconds, result = timed(lambda: function(*args, **kwargs), 1, self.device)
            self.seconds += seconds
            self.calls += 1
            return result
        return timed_call

    def _targets(self) -> list[tuple[Any, str]]:
        targets = []
        projectors = sys.modules.get("galore_plus.projectors")
        if projectors is not None:
            original = projectors.compute_basis
            for name, module in list(sys.modules.items()):
                if name.startswith("galore_plus") and getattr(module, "compute_basis", None) is original:
                    targets.append((module, "compute_basis"))
        for module_name, class_name in (("galore_torch.galore_projector", "GaLoreProjector"),
                                        ("fira.gradient_projection", "GradientProjector")):
            module = sys.modules.get(module_name)
            if module is not None:
                targets.append((getattr(module, class_name), "get_orthogonal_matrix"))
        return targets

    @contextmanager
    def patched(self) -> Iterator["RefreshTimer"]:
        originals = [(owner, name, getattr(owner, name)) for owner, name in self._targets()]
        for owner, name, function in originals:
            setattr(owner, name, self._timed(function))
        try:
            yield self
        finally:
            for owner, name, function in originals:
                setattr(owner, name, function)
