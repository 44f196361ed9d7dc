"""Amortized optimizer step on one decoder layer, against torch AdamW and galore_torch.

    python -m benchmarks.bench_step                           # TinyLlama-1.1B layer, rank 128, gap 50
    python -m benchmarks.bench_step --layer llama-7b --gaps 50 200 500
    python -m benchmarks.bench_step --device cuda             # on a GPU (benchmarks.gpu_check runs this)
    python -m benchmarks.bench_step --refresh-cost            # refresh cost per projector, 4096 x 4096, 32 heads
    python -m benchmarks.bench_step --only random APOLLO      # the random basis and APOLLO (ours, apollo_torch's) only
    python -m benchmarks.bench_step --levers                  # + the step-time ratio of each lever (docs/levers.md)
    python -m benchmarks.bench_step --experts 8 14336 4096 --threads 1 --cpu-time   # one Mixtral-8x7B expert stack

Each optimizer steps the seven weights of one layer (q, k, v, o, gate, up, down) for ``gap``
steps with fixed gradients, so every projected weight refreshes its basis exactly once; the
printed time is the mean over those steps. The floor is the time of the two rank-r matrix
products every projection method needs (R = G Q^T and U = N Q). All rows come from one run.
The ``random`` projector (nothing stored; APOLLO's basis) and APOLLO's rule (ours and
``apollo_torch``'s, channel scaling, scale 1) are among the rows; the last line is what
regenerating the random bases costs per step, as a fraction of that projector's step.

On CUDA the time is taken between two ``torch.cuda.synchronize()`` calls, torch's AdamW is its
fused kernel, and each row also shows the optimizer's peak memory: ``torch.cuda.max_memory_allocated``
during its steps minus the memory allocated before it was built (weights and gradients).

``--levers`` adds a table of each lever of docs/levers.md on top of GaLore (svd) and GaLore+,
as a ratio to the same optimizer without it. There every optimizer takes one untimed step first
(its first refresh), then ``gap`` timed steps, so the timed window holds one refresh that replaces
a basis (where moment transfer and the adaptive gap's overlap do their work). The adaptive gap
saves refreshes only over many gaps; its row shows what it costs, not what it saves.

``--experts E M N`` times instead one expert stack (E, M, N) in bfloat16 (Mixtral-8x7B's ``down_proj``
transposed is 8 x 14336 x 4096), stepped as one batched weight, as a loop over its E experts (E separate
2-D weights, views of the same storage, in one optimizer) and by torch's AdamW: the first step of
each (a refresh) and the mean of ``--plain-steps`` steps after it (no refresh), each optimizer fresh.

``--refresh-cost`` measures instead, for each projector on one (size x size) weight with ``heads``
heads (default: the LLaMA-2-7B q_proj, 4096 x 4096, 32 heads, rank 128), what a refresh adds to a
step: (time of a step that refreshes) - (mean time of the steps that do not), all in one run,
and prints svd's cost divided by each projector's.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from typing import Callable

import torch

from galore_plus import APOLLO, GaLorePlusAdamW
from galore_plus.kernels.dispatch import lowrank_adam_direction
from galore_plus.projectors import projection_side
from galore_plus.projectors.generators import basis_generator
from galore_plus.step.projection import project, project_back
from galore_plus.projectors.random import gaussian_basis

from .measure import mean_seconds
from .peers import APOLLO_SCALING, apollo_torch_adamw, galore_torch_adamw

RANDOM_LABEL = "GaLorePlusAdamW random (galore rule)"

LAYERS = {
    # name: hidden, intermediate, heads, key/value heads
    "tinyllama-1.1b": (2048, 5632, 32, 4),
    "llama-7b": (4096, 11008, 32, 32),
    "llama-130m": (768, 2048, 12, 12),
    "tiny": (64, 176, 4, 2),
    "finetune-small": (128, 352, 4, 4),  # a layer of the main job's default model (benchmarks/models.py "small")
}

LEVERS = {
    "moment_transfer": {"moment_transfer": True},
    "full_rank_residual": {"full_rank_residual": True},
    "scale='auto'": {"scale": "auto"},
    "adaptive_gap": {"adaptive_gap": True},
    "all four": {"moment_transfer": True, "full_rank_residual": True, "scale": "auto", "adaptive_gap": True},
}


def layer_weights(
    hidden: int, intermediate: int, heads: int, kv_heads: int, device: str | torch.device = "cpu"
) -> dict[str, torch.nn.Parameter]:
    head_dim = hidden // heads
    shapes = {
        "q_proj": (hidden, hidden), "k_proj": (kv_heads * head_dim, hidden), "v_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, hidden), "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden),
        "down_proj": (hidden, intermediate),
    }
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for name, shape in shapes.items():
        weight = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(device))
        weight.grad = (torch.randn(shape, generator=generator) * 1e-3).to(device)
        weights[name] = weight
    return weights


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
        bases[name] = (torch.randn((m, rank) if side == "left" else (rank, n), device=w.device), side)

    def run() -> None:
        for name, w in weights.items():
            basis, side = bases[name]
            project_back(project(w.grad, basis, side), basis, side)

    return run


def optimizers(weights, rank, gap, heads, kv_heads):
    """(label, factory) of every optimizer compared; each factory builds a fresh optimizer."""
    params = list(weights.values())
    if params[0].is_cuda:
        yield "torch AdamW (fused)", lambda: torch.optim.AdamW(params, lr=1e-5, fused=True)
    else:
        yield "torch AdamW (foreach)", lambda: torch.optim.AdamW(params, lr=1e-5, foreach=True)
    if importlib.util.find_spec("galore_torch") is None:
        print("galore_torch not installed: pip install galore-torch to compare against it")
    else:
        yield "galore_torch GaLoreAdamW", lambda: galore_torch_adamw(
            [{"params": params, "rank": rank, "update_proj_gap": gap, "scale": 0.25}], lr=1e-5)
    for projector in ("svd", "galore_plus"):
        label = "GaLorePlusAdamW svd" if projector == "svd" else "GaLorePlusAdamW cross_head+randomized"
        yield label, lambda projector=projector: GaLorePlusAdamW(
            galore_plus_groups(weights, rank, gap, heads, kv_heads, projector), lr=1e-5)
    yield RANDOM_LABEL, lambda: GaLorePlusAdamW(
        [{"params": params, "rank": rank, "update_proj_gap": gap, "projector": "random"}], lr=1e-5)
    # weight_decay=0 as apollo_torch's default (ours is 0.01: one more full-size pass, not a like-for-like comparison)
    yield "GaLorePlusAdamW APOLLO", lambda: GaLorePlusAdamW(
        [{"params": params, "rank": rank, **APOLLO, "update_proj_gap": gap}], lr=1e-5, weight_decay=0.0)
    if importlib.util.find_spec("apollo_torch") is None:
        print("apollo_torch not installed: pip install apollo-torch to compare against it")
    else:
        yield "apollo_torch APOLLOAdamW", lambda: apollo_torch_adamw(
            [{"params": params, "rank": rank, "update_proj_gap": gap, "scale": 1.0}], lr=1e-5,
            **APOLLO_SCALING)


def random_bases(weights: dict[str, torch.nn.Parameter], rank: int) -> Callable[[], None]:
    """What the ``random`` projector adds to every step: regenerating each weight's Gaussian basis."""
    sides = {name: projection_side(tuple(w.shape), "std", "random") for name, w in weights.items()}

    def run() -> None:
        for position, (name, w) in enumerate(weights.items()):
            gaussian_basis(tuple(w.shape), rank, sides[name], basis_generator(0, position, 0, w.device))

    return run


def warm_up_cuda(device: torch.device, rank: int) -> None:
    """First-call costs nobody should be timed with: cuBLAS/cuSOLVER handles and the Triton kernel's compilation."""
    matrix = torch.randn(256, 64, device=device)
    torch.linalg.svd(matrix, full_matrices=False)
    moments = torch.zeros(rank, 64, device=device), torch.zeros(rank, 64, device=device)
    lowrank_adam_direction(torch.randn(rank, 64, device=device), *moments, 1, 0.9, 0.999, 1e-8)
    torch.cuda.synchronize(device)


def timed_steps(factory: Callable[[], torch.optim.Optimizer], steps: int, device: torch.device) -> tuple[float, float | None]:
    """(mean seconds per step, peak MiB the optimizer added above the weights and gradients, or None off CUDA)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = factory()
    seconds = mean_seconds(optimizer.step, steps, device)
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if device.type == "cuda" else None
    del optimizer
    return seconds, peak


def refresh_cost(
    size: int, heads: int, rank: int, plain_steps: int, refreshes: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, tuple[float, float]]:
    """Projector -> (fastest step with a refresh, fastest step without one), in seconds of ``clock``.

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
            start = clock()
            optimizer.step()
            timed.append(clock() - start)
        with_refresh = min(timed[gap::gap])
        without = min(seconds for index, seconds in enumerate(timed) if index % gap)
        results[projector] = (with_refresh, without)
    return results


def expert_stack_times(
    shape: tuple[int, int, int], rank: int, projector: str, plain_steps: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, tuple[float | None, float]]:
    """Label -> (seconds of the first step, a refresh, or None for AdamW; mean seconds of the next ``plain_steps``).

    One bfloat16 stack and its gradient are shared by all rows: the loop's experts are views of it.
    """
    generator = torch.Generator().manual_seed(0)
    stack = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
    stack.grad = (torch.randn(shape, generator=generator) * 1e-3).to(torch.bfloat16)
    experts = [torch.nn.Parameter(stack.detach()[e]) for e in range(shape[0])]
    for e, expert in enumerate(experts):
        expert.grad = stack.grad[e]
    group = {"rank": rank, "update_proj_gap": plain_steps + 1, "projector": projector}
    factories = {
        "torch AdamW (foreach)": lambda: torch.optim.AdamW([stack], lr=1e-5, foreach=True),
        f"GaLorePlusAdamW {projector}, batched stack": lambda: GaLorePlusAdamW([{"params": [stack], **group}], lr=1e-5),
        f"GaLorePlusAdamW {projector}, loop of {shape[0]} experts": lambda: GaLorePlusAdamW(
            [{"params": experts, **group}], lr=1e-5),
    }
    results = {}
    for label, factory in factories.items():
        optimizer = factory()
        start = clock()
        optimizer.step()
        first = clock() - start
        start = clock()
        for _ in range(plain_steps):
            optimizer.step()
        results[label] = (None if label.startswith("torch") else first, (clock() - start) / plain_steps)
        del optimizer
    return results


def print_expert_stack(shape: tuple[int, int, int], rank: int, projector: str, plain_steps: int, cpu_time: bool) -> None:
    clock = time.process_time if cpu_time else time.perf_counter
    print(f"expert stack {' x '.join(map(str, shape))} bfloat16, rank {rank}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {'process CPU' if cpu_time else 'wall'} time")
    results = expert_stack_times(shape, rank, projector, plain_steps, clock)
    loop = next(times for label, times in results.items() if "loop" in label)
    adamw = results["torch AdamW (foreach)"][1]
    print(f"{'optimizer':>44} {'refresh step s':>15} {'step s':>8} {'x AdamW':>8} {'loop / this':>12}")
    for label, (first, plain) in results.items():
        first_text = f"{first:>15.3f}" if first is not None else f"{'-':>15}"
        versus_loop = "" if label.startswith("torch") else f"{loop[1] / plain:>12.2f}"
        print(f"{label:>44} {first_text} {plain:>8.3f} {plain / adamw:>8.2f} {versus_loop}")
    batched = next(times for label, times in results.items() if "batched" in label)
    print(f"refresh step: loop / batched = {loop[0] / batched[0]:.2f}")


def print_refresh_cost(size: int, heads: int, rank: int, plain_steps: int, refreshes: int, cpu_time: bool) -> None:
    clock = time.process_time if cpu_time else time.perf_counter
    print(f"refresh cost, {size}x{size} weight, {heads} heads, rank {rank}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {'process CPU' if cpu_time else 'wall'} time")
    print(f"{'projector':>12} {'step+refresh ms':>16} {'step ms':>9} {'refresh ms':>11} {'svd refresh / this':>19}")
    results = refresh_cost(size, heads, rank, plain_steps, refreshes, clock)
    costs = {projector: with_refresh - without for projector, (with_refresh, without) in results.items()}
    for projector, (with_refresh, without) in results.items():
        print(f"{projector:>12} {with_refresh * 1e3:>16.1f} {without * 1e3:>9.1f} {costs[projector] * 1e3:>11.1f} "
              f"{costs['svd'] / costs[projector]:>19.1f}")


def lever_table(weights, rank: int, gap: int, heads: int, kv_heads: int, device: torch.device) -> None:
    """Each lever's step time as a ratio to the same optimizer without any lever, all measured in this run.

    Every row sets ``full_rank_residual`` explicitly (False unless it is the lever timed), since it is on by default
    for GaLore+'s projectors: the base rows are the optimizers without levers.
    """
    print(f"\n{'levers (1 untimed step, then gap steps)':>40} {'gap':>5} {'ms/step':>9} {'x without':>10}")
    for projector, name in (("svd", "GaLore (svd)"), ("galore_plus", "GaLore+ (no levers)")):
        times = {}
        for lever, keys in {"": {}, **LEVERS}.items():
            keys = {"full_rank_residual": False, **keys}
            optimizer = GaLorePlusAdamW(galore_plus_groups(weights, rank, gap, heads, kv_heads, projector, **keys), lr=1e-5)
            optimizer.step()
            times[lever] = mean_seconds(optimizer.step, gap, device)
        for lever, seconds in times.items():
            label = name + (f" + {lever}" if lever else "")
            print(f"{label:>40} {gap:>5} {seconds * 1e3:>9.1f} {seconds / times['']:>10.2f}")


def main(argv: list[str] | None = None) -> dict[int, dict[str, tuple[float, float | None]]] | None:
    """Print the table; return {gap: {optimizer: (seconds per step, peak MiB or None)}} (None with --refresh-cost)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", default="tinyllama-1.1b", choices=sorted(LAYERS))
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gaps", nargs="+", type=int, default=[50])
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only the optimizers whose label contains one of these (and torch AdamW), e.g. random APOLLO")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda also reports peak memory)")
    parser.add_argument("--refresh-cost", action="store_true", help="measure what a refresh adds to a step instead")
    parser.add_argument("--size", type=int, default=4096, help="--refresh-cost: the weight is size x size")
    parser.add_argument("--heads", type=int, default=32, help="--refresh-cost: heads of the cross_head weight")
    parser.add_argument("--plain-steps", type=int, default=3, help="--refresh-cost: steps between refreshes")
    parser.add_argument("--refreshes", type=int, default=5, help="--refresh-cost: warm refreshes timed (svd: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--levers", action="store_true", help="also time each lever of docs/levers.md")
    parser.add_argument("--experts", nargs=3, type=int, default=None, metavar=("E", "M", "N"),
                        help="time one bfloat16 expert stack (E, M, N): batched, a loop over its experts, AdamW")
    parser.add_argument("--projector", default="randomized", help="--experts: the projector (default randomized)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="--refresh-cost, --experts: time with the process's CPU time, which other load on a shared "
                             "machine disturbs less than wall time (use with --threads 1)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.refresh_cost:
        print_refresh_cost(args.size, args.heads, args.rank, args.plain_steps, args.refreshes, args.cpu_time)
        return None
    if args.experts is not None:
        print_expert_stack(tuple(args.experts), args.rank, args.projector, args.plain_steps, args.cpu_time)
        return None
    device = torch.device(args.device)
    hidden, intermediate, heads, kv_heads = LAYERS[args.layer]
    weights = layer_weights(hidden, intermediate, heads, kv_heads, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads {torch.get_num_threads()}"
    print(f"{args.layer} layer, rank {args.rank}, torch {torch.__version__}, {device.type} ({where})")
    if device.type == "cuda":
        warm_up_cuda(device, args.rank)
    products = two_products(weights, args.rank)
    products()  # warm-up of allocators and BLAS
    floor = mean_seconds(products, 5, device)
    print(f"{'optimizer':>40} {'gap':>5} {'ms/step':>9} {'x two products':>15} {'x galore_torch':>15} {'x AdamW':>8}"
          f" {'peak MiB':>9}")
    print(f"{'two rank-r products (floor)':>40} {'-':>5} {floor * 1e3:>9.1f} {1.0:>15.2f}")
    results = {}
    for gap in args.gaps:
        results[gap] = {label: timed_steps(factory, gap, device)
                        for label, factory in optimizers(weights, args.rank, gap, heads, kv_heads)
                        if not args.only or label.startswith("torch AdamW") or any(part in label for part in args.only)}
        galore = results[gap].get("galore_torch GaLoreAdamW", (None,))[0]
        adamw = next(seconds for label, (seconds, _) in results[gap].items() if label.startswith("torch AdamW"))
        for label, (seconds, peak) in results[gap].items():
            versus_galore = f"{seconds / galore:>15.2f}" if galore else f"{'n/a':>15}"
            peak_text = f"{peak:>9.0f}" if peak is not None else f"{'n/a':>9}"
            print(f"{label:>40} {gap:>5} {seconds * 1e3:>9.1f} {seconds / floor:>15.2f} {versus_galore}"
                  f" {seconds / adamw:>8.2f} {peak_text}")
        if RANDOM_LABEL in results[gap]:
            regenerate = mean_seconds(random_bases(weights, args.rank), 5, device)
            print(f"regenerating the 7 random bases: {regenerate * 1e3:.1f} ms per step = "
                  f"{regenerate / results[gap][RANDOM_LABEL][0]:.3f} of the random projector's step (gap {gap})")
        if args.levers:
            lever_table(weights, args.rank, gap, heads, kv_heads, device)
    return results


if __name__ == "__main__":
    main()
