"""Amortized optimizer step on one decoder layer, against torch AdamW and galore_torch.

    python -m benchmarks.bench_step                           # TinyLlama-1.1B layer, rank 128, gap 50
    python -m benchmarks.bench_step --layer llama-7b --gaps 50 200 500
    python -m benchmarks.bench_step --device cuda             # on a GPU (benchmarks.gpu_check runs this)

Each optimizer steps the seven weights of one layer (q, k, v, o, gate, up, down) for ``gap``
steps with fixed gradients, so every projected weight refreshes its basis exactly once; the
printed time is the mean over those steps. The floor is the time of the two rank-r matrix
products every projection method needs (R = G Q^T and U = N Q). All rows come from one run.

On CUDA the time is taken between two ``torch.cuda.synchronize()`` calls, torch's AdamW is its
fused kernel, and each row also shows the optimizer's peak memory: ``torch.cuda.max_memory_allocated``
during its steps minus the memory allocated before it was built (weights and gradients).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from galore_plus import GaLorePlusAdamW
from galore_plus.dispatch import lowrank_adam_direction
from galore_plus.projectors import project, project_back, projection_side

LAYERS = {
    # name: hidden, intermediate, heads, key/value heads
    "tinyllama-1.1b": (2048, 5632, 32, 4),
    "llama-7b": (4096, 11008, 32, 32),
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
        bases[name] = (torch.randn((m, rank) if side == "left" else (rank, n), device=w.device), side)

    def run() -> None:
        for name, w in weights.items():
            basis, side = bases[name]
            project_back(project(w.grad, basis, side), basis, side)

    return run


def mean_step_seconds(step: Callable[[], None], steps: int, device: torch.device = torch.device("cpu")) -> float:
    """Mean wall time of ``steps`` calls; on CUDA the queued work is waited for before and after."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return (time.perf_counter() - start) / steps


def optimizers(weights, rank, gap, heads, kv_heads):
    """(label, factory) of every optimizer compared; each factory builds a fresh optimizer."""
    params = list(weights.values())
    if params[0].is_cuda:
        yield "torch AdamW (fused)", lambda: torch.optim.AdamW(params, lr=1e-5, fused=True)
    else:
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
    seconds = mean_step_seconds(optimizer.step, steps, device)
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if device.type == "cuda" else None
    del optimizer
    return seconds, peak


def main(argv: list[str] | None = None) -> dict[int, dict[str, tuple[float, float | None]]]:
    """Print the table; return {gap: {optimizer: (seconds per step, peak MiB or None)}}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", default="tinyllama-1.1b", choices=sorted(LAYERS))
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gaps", nargs="+", type=int, default=[50])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda also reports peak memory)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    hidden, intermediate, heads, kv_heads = LAYERS[args.layer]
    weights = layer_weights(hidden, intermediate, heads, kv_heads, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads {torch.get_num_threads()}"
    print(f"{args.layer} layer, rank {args.rank}, torch {torch.__version__}, {device.type} ({where})")
    if device.type == "cuda":
        warm_up_cuda(device, args.rank)
    products = two_products(weights, args.rank)
    products()  # warm-up of allocators and BLAS
    floor = mean_step_seconds(products, 5, device)
    print(f"{'optimizer':>40} {'gap':>5} {'ms/step':>9} {'x two products':>15} {'x galore_torch':>15} {'x AdamW':>8}"
          f" {'peak MiB':>9}")
    print(f"{'two rank-r products (floor)':>40} {'-':>5} {floor * 1e3:>9.1f} {1.0:>15.2f}")
    results = {}
    for gap in args.gaps:
        results[gap] = {label: timed_steps(factory, gap, device)
                        for label, factory in optimizers(weights, args.rank, gap, heads, kv_heads)}
        galore = results[gap].get("galore_torch GaLoreAdamW", (None,))[0]
        adamw = next(seconds for label, (seconds, _) in results[gap].items() if label.startswith("torch AdamW"))
        for label, (seconds, peak) in results[gap].items():
            versus_galore = f"{seconds / galore:>15.2f}" if galore else f"{'n/a':>15}"
            peak_text = f"{peak:>9.0f}" if peak is not None else f"{'n/a':>9}"
            print(f"{label:>40} {gap:>5} {seconds * 1e3:>9.1f} {seconds / floor:>15.2f} {versus_galore}"
                  f" {seconds / adamw:>8.2f} {peak_text}")
    return results


if __name__ == "__main__":
    main()
