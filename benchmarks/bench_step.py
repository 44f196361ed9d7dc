"""Amortized optimizer step on one decoder layer, against torch AdamW and galore_torch.

    python -m benchmarks.bench_step                           # TinyLlama-1.1B layer, rank 128, gap 50
    python -m benchmarks.bench_step --layer llama-7b --gaps 50 200 500
    python -m benchmarks.bench_step --levers                  # + the step-time ratio of each lever (docs/levers.md)

Each optimizer steps the seven weights of one layer (q, k, v, o, gate, up, down) for ``gap``
steps with fixed gradients, so every projected weight refreshes its basis exactly once; the
printed time is the mean over those steps. The floor is the time of the two rank-r matrix
products every projection method needs (R = G Q^T and U = N Q). All rows come from one run.

``--levers`` adds a table of each lever of docs/levers.md on top of GaLore (svd) and GaLore+,
as a ratio to the same optimizer without it. There every optimizer takes one untimed step first
(its first refresh), then ``gap`` timed steps, so the timed window holds one refresh that replaces
a basis (where moment transfer and the adaptive gap's overlap do their work). The adaptive gap
saves refreshes only over many gaps; its row shows what it costs, not what it saves.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from galore_plus import GaLorePlusAdamW
from galore_plus.projectors import project, project_back, projection_side

LAYERS = {
    # name: hidden, intermediate, heads, key/value heads
    "tinyllama-1.1b": (2048, 5632, 32, 4),
    "llama-7b": (4096, 11008, 32, 32),
    "llama-130m": (768, 2048, 12, 12),
    "tiny": (64, 176, 4, 2),
}


def layer_weights(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict[str, torch.nn.Parameter]:
    head_dim = hidden // heads
    shapes = {
        "q_proj": (hidden, hidden), "k_proj": (kv_heads * head_dim, hidden), "v_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, hidden), "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden),
        "down_proj": (hidden, intermediate),
    }
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for name, shape in shapes.items():
        weight = torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.02)
        weight.grad = torch.randn(shape, generator=generator) * 1e-3
        weights[name] = weight
    return weights


LEVERS = {
    "moment_transfer": {"moment_transfer": True},
    "full_rank_residual": {"full_rank_residual": True},
    "scale='auto'": {"scale": "auto"},
    "adaptive_gap": {"adaptive_gap": True},
    "all four": {"moment_transfer": True, "full_rank_residual": True, "scale": "auto", "adaptive_gap": True},
}


def galore_plus_groups(weights, rank, gap, heads, kv_heads, projector, **levers):
    if projector == "svd":
        return [{"params": list(weights.values()), "rank": rank, "update_proj_gap": gap, "projector": "svd", **levers}]
    other = [w for name, w in weights.items() if name not in ("q_proj", "k_proj")]
    common = dict(rank=rank, update_proj_gap=gap, **levers)
    return [
        {"params": [weights["q_proj"]], "projector": "cross_head", "num_heads": heads, **common},
        {"params": [weights["k_proj"]], "projector": "cross_head", "num_heads": kv_heads, **common},
        {"params": other, "projector": "randomized", **common},
    ]


def two_products(weights: dict[str, torch.nn.Parameter], rank: int) -> Callable[[], None]:
    """The floor: R = G Q^T (or P^T G) and U = N Q (or P N) for every weight, nothing else."""
    bases = {}
    for name, w in weights.items():
        side = projection_side(tuple(w.shape), "std", "randomized")
        m, n = w.shape
        bases[name] = (torch.randn((m, rank) if side == "left" else (rank, n)), side)

    def run() -> None:
        for name, w in weights.items():
            basis, side = bases[name]
            project_back(project(w.grad, basis, side), basis, side)

    return run


def mean_step_seconds(step: Callable[[], None], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def optimizers(weights, rank, gap, heads, kv_heads):
    """(label, factory) of every optimizer compared; each factory builds a fresh optimizer."""
    params = list(weights.values())
    yield "torch AdamW (foreach)", lambda: torch.optim.AdamW(params, lr=1e-5, foreach=True)
    try:
        from galore_torch import GaLoreAdamW
    except ImportError:
        print("galore_torch not installed: pip install galore-torch to compare against it")
    else:
        yield "galore_torch GaLoreAdamW", lambda: GaLoreAdamW(
            [{"params": params, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}], lr=1e-5)
    for projector in ("svd", "galore_plus"):
        label = "GaLorePlusAdamW svd" if projector == "svd" else "GaLorePlusAdamW cross_head+randomized"
        yield label, lambda projector=projector: GaLorePlusAdamW(
            galore_plus_groups(weights, rank, gap, heads, kv_heads, projector), lr=1e-5)


def lever_table(weights, rank: int, gap: int, heads: int, kv_heads: int) -> None:
    """Each lever's step time as a ratio to the same optimizer without it, all measured in this run."""
    print(f"\n{'levers (1 untimed step, then gap steps)':>40} {'gap':>5} {'ms/step':>9} {'x without':>10}")
    for projector, name in (("svd", "GaLore (svd)"), ("galore_plus", "GaLore+")):
        times = {}
        for lever, keys in {"": {}, **LEVERS}.items():
            optimizer = GaLorePlusAdamW(galore_plus_groups(weights, rank, gap, heads, kv_heads, projector, **keys), lr=1e-5)
            optimizer.step()
            times[lever] = mean_step_seconds(optimizer.step, gap)
        for lever, seconds in times.items():
            label = name + (f" + {lever}" if lever else "")
            print(f"{label:>40} {gap:>5} {seconds * 1e3:>9.1f} {seconds / times['']:>10.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", default="tinyllama-1.1b", choices=sorted(LAYERS))
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gaps", nargs="+", type=int, default=[50])
    parser.add_argument("--levers", action="store_true", help="also time each lever of docs/levers.md")
    args = parser.parse_args(argv)
    hidden, intermediate, heads, kv_heads = LAYERS[args.layer]
    weights = layer_weights(hidden, intermediate, heads, kv_heads)
    print(f"{args.layer} layer, rank {args.rank}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    products = two_products(weights, args.rank)
    products()  # warm-up of allocators and BLAS
    floor = mean_step_seconds(products, 5)
    print(f"{'optimizer':>40} {'gap':>5} {'ms/step':>9} {'x two products':>15} {'x galore_torch':>15} {'x AdamW':>8}")
    print(f"{'two rank-r products (floor)':>40} {'-':>5} {floor * 1e3:>9.1f} {1.0:>15.2f}")
    for gap in args.gaps:
        results = {}
        for label, factory in optimizers(weights, args.rank, gap, heads, kv_heads):
            optimizer = factory()
            results[label] = mean_step_seconds(optimizer.step, gap)
        galore = results.get("galore_torch GaLoreAdamW")
        adamw = results["torch AdamW (foreach)"]
        for label, seconds in results.items():
            versus_galore = f"{seconds / galore:>15.2f}" if galore else f"{'n/a':>15}"
            print(f"{label:>40} {gap:>5} {seconds * 1e3:>9.1f} {seconds / floor:>15.2f} {versus_galore} {seconds / adamw:>8.2f}")
        if args.levers:
            lever_table(weights, args.rank, gap, heads, kv_heads)


if __name__ == "__main__":
    main()
