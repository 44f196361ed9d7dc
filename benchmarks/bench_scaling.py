"""How the optimizer step time and state memory of each method scale with the hidden size.

    python -m benchmarks.bench_scaling                          # hidden 256, 512, 1024; rank 64; gap 50
    python -m benchmarks.bench_scaling --hidden 512 1024 2048 --rank 128 --gap 200

One LLaMA decoder layer (q, k, v, o, gate, up, down; MLP size 8/3 hidden rounded up to 256 as in LLaMA; head
size 64) per hidden size, with fixed random gradients, stepped ``gap`` times by each optimizer of
``benchmarks.bench_step`` (torch AdamW, galore_torch when installed, GaLorePlusAdamW svd and
cross_head + randomized), so every projected weight refreshes its basis once: the time is the
amortized step (the fastest of ``--repeats`` runs). State bytes are counted from the optimizer's tensors. The last columns are the
log-log slope of time and state against the hidden size (2 means quadratic). All rows come from
one run; results are printed and written to ``--out`` as Markdown and JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from .bench_step import layer_weights, optimizers
from .measure import mean_seconds, tensor_bytes

MIB = 2**20
HEAD_DIM = 64


def mlp_size(hidden: int) -> int:
    """LLaMA's MLP width: 8/3 of the hidden size, rounded up to a multiple of 256 (11008 for 4096)."""
    return 256 * math.ceil(8 * hidden / 3 / 256)


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def measure(hidden: int, rank: int, gap: int, repeats: int) -> dict[str, dict[str, float]]:
    """{optimizer label: {"ms": amortized ms per step, "state_mib": optimizer state}} for one layer.

    Each optimizer is built afresh and stepped ``gap`` times, ``repeats`` times; the fastest
    repeat counts (the others were slowed by something else running on the machine).
    """
    heads = hidden // HEAD_DIM
    weights = layer_weights(hidden, mlp_size(hidden), heads, heads)
    results = {}
    for label, factory in optimizers(weights, rank, gap, heads, heads):
        timings = []
        for _ in range(repeats):
            optimizer = factory()
            timings.append(mean_seconds(optimizer.step, gap))
        results[label] = {"ms": 1e3 * min(timings), "state_mib": tensor_bytes(list(optimizer.state.values())) / MIB}
    return results


def markdown(by_hidden: dict[int, dict[str, dict[str, float]]]) -> str:
    sizes = sorted(by_hidden)
    labels = list(by_hidden[sizes[0]])
    adamw = labels[0]
    header = ["optimizer"] + [f"h={h}: ms/step (x AdamW), state MiB" for h in sizes] + ["time slope", "state slope"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        cells = [label]
        for h in sizes:
            row = by_hidden[h][label]
            cells.append(f"{row['ms']:.1f} ({row['ms'] / by_hidden[h][adamw]['ms']:.2f}), {row['state_mib']:.2f}")
        if len(sizes) > 1:
            cells.append(f"{loglog_slope(sizes, [by_hidden[h][label]['ms'] for h in sizes]):.2f}")
            cells.append(f"{loglog_slope(sizes, [by_hidden[h][label]['state_mib'] for h in sizes]):.2f}")
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", nargs="+", type=int, default=[256, 512, 1024], help="hidden sizes (multiples of 64)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--gap", type=int, default=50, help="update_proj_gap; each optimizer is stepped this many times")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per optimizer; the fastest counts")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", default=os.path.join("results", "bench_scaling"))
    args = parser.parse_args(argv)
    for hidden in args.hidden:
        if hidden % HEAD_DIM or hidden < args.rank:
            parser.error(f"--hidden {hidden} must be a multiple of {HEAD_DIM} and at least --rank {args.rank}")
    if args.gap < 1 or args.repeats < 1:
        parser.error(f"--gap and --repeats must be >= 1, got {args.gap} and {args.repeats}")
    os.makedirs(args.out, exist_ok=True)
    previous_threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"rank {args.rank}, gap {args.gap}, repeats {args.repeats}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    try:
        by_hidden = {hidden: measure(hidden, args.rank, args.gap, args.repeats) for hidden in args.hidden}
    finally:
        torch.set_num_threads(previous_threads)
    table = markdown(by_hidden)
    print(table)
    with open(os.path.join(args.out, "bench_scaling.md"), "w") as handle:
        handle.write(table)
    with open(os.path.join(args.out, "bench_scaling.json"), "w") as handle:
        json.dump({"settings": vars(args), "results": by_hidden}, handle, indent=1)
    return by_hidden


if __name__ == "__main__":
    main()
