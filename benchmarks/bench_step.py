"""Amortized optimizer step on one decoder layer, against torch AdamW and galore_torch.

    python -m benchmarks.bench_step                           # TinyLlama-1.1B layer, rank 128, gap 50
    python -m benchmarks.bench_step --layer llama-7b --gaps 50 200 500
    python -m benchmarks.bench_step --refresh-cost            # refresh cost per projector, 4096 x 4096, 32 heads
    python -m benchmarks.bench_step --only random APOLLO      # the random basis and APOLLO (ours, apollo_torch's) only

Each optimizer steps the seven weights of one layer (q, k, v, o, gate, up, down) for ``gap``
steps with fixed gradients, so every projected weight refreshes its basis exactly once; the
printed time is the mean over those steps. The floor is the time of the two rank-r matrix
products every projection method needs (R = G Q^T and U = N Q). All rows come from one run.
The ``random`` projector (nothing stored; APOLLO's basis) and APOLLO's rule (ours and
``apollo_torch``'s, channel scaling, scale 1) are among the rows; the last line is what
regenerating the random bases costs per step, as a fraction of that projector's step.

``--refresh-cost`` measures instead, for each projector on one (size x size) weight with ``heads``
heads (default: the LLaMA-2-7B q_proj, 4096 x 4096, 32 heads, rank 128), what a refresh adds to a
step: (time of a step that refreshes) - (mean time of the steps that do not), all in one run,
and prints svd's cost divided by each projector's.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from galore_plus import APOLLO, GaLorePlusAdamW
from galore_plus.projectors import basis_generator, project, project_back, projection_side
from galore_plus.random_basis import gaussian_basis

RANDOM_LABEL = "GaLorePlusAdamW random (galore rule)"
ADAMW_LABEL = "torch AdamW (foreach)"

LAYERS = {
    # name: hidden, intermediate, heads, key/value heads
    "tinyllama-1.1b": (2048, 5632, 32, 4),
    "tiny": (64, 96, 4, 2),
    "llama-7b": (4096, 11008, 32, 32),
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


def galore_plus_groups(weights, rank, gap, heads, kv_heads, projector):
    if projector == "svd":
        return [{"params": list(weights.values()), "rank": rank, "update_proj_gap": gap, "projector": "svd"}]
    other = [w for name, w in weights.items() if name not in ("q_proj", "k_proj")]
    common = dict(rank=rank, update_proj_gap=gap)
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
    yield ADAMW_LABEL, lambda: torch.optim.AdamW(params, lr=1e-5, foreach=True)
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
    yield RANDOM_LABEL, lambda: GaLorePlusAdamW(
        [{"params": params, "rank": rank, "update_proj_gap": gap, "projector": "random"}], lr=1e-5)
    yield "GaLorePlusAdamW APOLLO", lambda: GaLorePlusAdamW(
        [{"params": params, "rank": rank, **APOLLO, "update_proj_gap": gap}], lr=1e-5)
    try:
        from apollo_torch import APOLLOAdamW
    except ImportError:
        print("apollo_torch not installed: pip install apollo-torch to compare against it")
    else:
        yield "apollo_torch APOLLOAdamW", lambda: APOLLOAdamW(
            [{"params": params, "rank": rank, "proj": "random", "scale_type": "channel", "scale": 1.0,
              "update_proj_gap": gap, "proj_type": "std"}], lr=1e-5)


def random_bases(weights: dict[str, torch.nn.Parameter], rank: int) -> Callable[[], None]:
    """What the ``random`` projector adds to every step: regenerating each weight's Gaussian basis."""
    sides = {name: projection_side(tuple(w.shape), "std", "random") for name, w in weights.items()}

    def run() -> None:
        for position, (name, w) in enumerate(weights.items()):
            gaussian_basis(tuple(w.shape), rank, sides[name], basis_generator(0, position, 0, w.device))

    return run


def refresh_cost(size: int, heads: int, rank: int, plain_steps: int, refreshes: int) -> dict[str, tuple[float, float]]:
    """Projector -> (fastest step with a refresh, fastest step without one), in seconds.

    Each optimizer steps one weight with gap ``plain_steps + 1``; the first (cold) refresh is not
    timed, the next ``refreshes`` (warm, as in training; svd: one, it takes seconds) are. The
    fastest of each kind is the one least disturbed by other load on the machine.
    """
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(size, size, generator=generator) * 0.02)
    weight.grad = torch.randn(size, size, generator=generator) * 1e-3
    gap = plain_steps + 1
    results = {}
    for projector in ("svd", "randomized", "cross_head"):
        optimizer = GaLorePlusAdamW([{"params": [weight], "rank": rank, "update_proj_gap": gap, "projector": projector,
                                      "num_heads": heads if projector == "cross_head" else None}], lr=1e-5)
        timed = []
        for _ in range((1 + (1 if projector == "svd" else refreshes)) * gap):
            start = time.perf_counter()
            optimizer.step()
            timed.append(time.perf_counter() - start)
        with_refresh = min(timed[gap::gap])
        without = min(seconds for index, seconds in enumerate(timed) if index % gap)
        results[projector] = (with_refresh, without)
    return results


def print_refresh_cost(size: int, heads: int, rank: int, plain_steps: int, refreshes: int) -> None:
    print(f"refresh cost, {size}x{size} weight, {heads} heads, rank {rank}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'projector':>12} {'step+refresh ms':>16} {'step ms':>9} {'refresh ms':>11} {'svd refresh / this':>19}")
    results = refresh_cost(size, heads, rank, plain_steps, refreshes)
    costs = {projector: with_refresh - without for projector, (with_refresh, without) in results.items()}
    for projector, (with_refresh, without) in results.items():
        print(f"{projector:>12} {with_refresh * 1e3:>16.1f} {without * 1e3:>9.1f} {costs[projector] * 1e3:>11.1f} "
              f"{costs['svd'] / costs[projector]:>19.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", default="tinyllama-1.1b", choices=sorted(LAYERS))
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gaps", nargs="+", type=int, default=[50])
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only the optimizers whose label contains one of these (and torch AdamW), e.g. random APOLLO")
    parser.add_argument("--refresh-cost", action="store_true", help="measure what a refresh adds to a step instead")
    parser.add_argument("--size", type=int, default=4096, help="--refresh-cost: the weight is size x size")
    parser.add_argument("--heads", type=int, default=32, help="--refresh-cost: heads of the cross_head weight")
    parser.add_argument("--plain-steps", type=int, default=3, help="--refresh-cost: steps between refreshes")
    parser.add_argument("--refreshes", type=int, default=5, help="--refresh-cost: warm refreshes timed (svd: 1)")
    args = parser.parse_args(argv)
    if args.refresh_cost:
        print_refresh_cost(args.size, args.heads, args.rank, args.plain_steps, args.refreshes)
        return
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
            if args.only and label != ADAMW_LABEL and not any(part in label for part in args.only):
                continue
            optimizer = factory()
            results[label] = mean_step_seconds(optimizer.step, gap)
        galore = results.get("galore_torch GaLoreAdamW")
        adamw = results[ADAMW_LABEL]
        for label, seconds in results.items():
            versus_galore = f"{seconds / galore:>15.2f}" if galore else f"{'n/a':>15}"
            print(f"{label:>40} {gap:>5} {seconds * 1e3:>9.1f} {seconds / floor:>15.2f} {versus_galore} {seconds / adamw:>8.2f}")
        if RANDOM_LABEL not in results:
            continue
        regenerate = mean_step_seconds(random_bases(weights, args.rank), 5)
        print(f"regenerating the 7 random bases: {regenerate * 1e3:.1f} ms per step = "
              f"{regenerate / results[RANDOM_LABEL]:.3f} of the random projector's step (gap {gap})")


if __name__ == "__main__":
    main()
