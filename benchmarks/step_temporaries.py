"""Temporary memory of one optimizer step per weight shape of a model, without building the model.

    python -m benchmarks.step_temporaries                      # LLaMA-2-7B, GaLore+ 8-bit, rank 128
    python -m benchmarks.step_temporaries --model tinyllama-1.1b --method galore+32

The memory estimator counts what persists (parameters, gradients, optimizer state); a step also
allocates transient buffers (a float32 copy of the gradient, of a bfloat16 weight, dequantised
moments, the refresh's sketches). For every distinct (shape, parameter group) of the model (taken
from the meta-device model with the same groups as ``benchmarks.fit_7b``), one bfloat16 parameter
of that shape is stepped twice (step 1 refreshes the basis, step 2 does not) with a random
gradient; printed: the growth of peak resident memory (VmHWM) during each step over the resident
memory before it, beside the persistent bytes of the gradient and of the state.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import torch
from torch import nn

from galore_plus import GaLorePlusAdamW
from galore_plus.memory import GIB, build_meta_model, load_config

from .fit_7b import DTYPE, METHODS, training_groups
from .measure import tensor_bytes, timed
from .resident import peak_resident_bytes, reset_peak_resident, resident_bytes

MIB = 2**20


def distinct_weights(groups: list[dict[str, Any]]) -> list[tuple[tuple[int, ...], dict[str, Any], int]]:
    """(shape, group options without params, how many parameters share them), in first-seen order."""
    seen: dict[tuple, list] = {}
    for group in groups:
        options = {key: value for key, value in group.items() if key != "params"}
        for param in group["params"]:
            key = (tuple(param.shape), repr(sorted(options.items())))
            seen.setdefault(key, [tuple(param.shape), options, 0])[2] += 1
    return [tuple(entry) for entry in seen.values()]


def step_growth(shape: tuple[int, ...], options: dict[str, Any], bits: int, steps: int = 2) -> list[dict[str, Any]]:
    """Peak resident growth, seconds and persistent bytes of ``steps`` optimizer steps of one bfloat16 parameter."""
    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.randn(shape, generator=generator, dtype=DTYPE) * 0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a plain group alone: "no parameter group with 'rank'"
        optimizer = GaLorePlusAdamW([dict(options, params=[param])], optim_bits=bits)
    results = []
    for _ in range(steps):
        param.grad = torch.randn(shape, generator=generator, dtype=DTYPE)
        before = resident_bytes()
        reset_peak_resident()
        seconds, _ = timed(optimizer.step)
        results.append(dict(peak_growth=peak_resident_bytes() - before, seconds=seconds, grad_bytes=param.grad.nbytes,
                            state_bytes=tensor_bytes(list(optimizer.state.values()))))
        param.grad = None
    return results


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_temporaries", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a config of galore_plus.memory (default llama2-7b)")
    parser.add_argument("--config", help="a JSON file of transformers config fields including model_type")
    parser.add_argument("--method", default="galore+8", choices=sorted(METHODS))
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--residual-ratio", type=float, default=0.012)
    args = parser.parse_args(argv)
    if args.model is None and args.config is None:
        args.model = "llama2-7b"
    method, bits = METHODS[args.method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = training_groups(build_meta_model(load_config(args.model, args.config), DTYPE), method, args.rank,
                                 args.residual_ratio, residual_warmup=1)
    rows = []
    print(f"{args.model or args.config}, {args.method}: peak resident growth of one step (MiB) per weight shape")
    print(f"{'shape':>14} {'count':>5} {'projector':>11} {'grad':>6} {'state':>6} {'step 1':>7} {'s':>6} {'step 2':>7} {'s':>6}")
    for shape, options, count in distinct_weights(groups):
        first, second = step_growth(shape, options, bits)
        row = dict(shape=list(shape), count=count, projector=options.get("projector", "plain AdamW"), first=first,
                   second=second)
        rows.append(row)
        print(f"{'x'.join(map(str, shape)):>14} {count:>5} {row['projector']:>11} {first['grad_bytes'] / MIB:>6.0f} "
              f"{second['state_bytes'] / MIB:>6.1f} {first['peak_growth'] / MIB:>7.0f} {first['seconds']:>6.1f} "
              f"{second['peak_growth'] / MIB:>7.0f} {second['seconds']:>6.1f}", flush=True)
    largest = max(max(row["first"]["peak_growth"], row["second"]["peak_growth"]) for row in rows)
    print(f"largest single-step growth: {largest / GIB:.2f} GiB")
    return rows


if __name__ == "__main__":
    main()
