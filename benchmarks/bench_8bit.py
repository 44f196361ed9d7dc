"""8-bit against 32-bit moments: optimizer state bytes and step time, as ratios from one run.

    python -m benchmarks.bench_8bit            # LLaMA-2-7B shapes (about 2 minutes on 2 CPU cores)
    python -m benchmarks.bench_8bit --small    # 1024-wide shapes, seconds

Cases: a 4096 x 4096 query weight (cross_head, 32 heads, rank 128, residual 1.2%), a 11008 x 4096
MLP weight (randomized, rank 128) and a 4096 x 4096 plain AdamW tensor (bitsandbytes' fused 8-bit
update). The step time is the median over ``--steps`` steady-state steps (after the first step,
the projector refresh and the residual index selection), the two bit widths stepping alternately;
state bytes are the bytes of the tensors in
``optimizer.state`` and equal ``galore_plus.memory``'s estimate, which is printed next to them.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from galore_plus import GaLorePlusAdamW
from galore_plus.memory import optimizer_state_bytes

from .measure import tensor_bytes, timed

MIB = 2**20
TARGET_MIB = 5.0


def cases(small: bool) -> list[tuple[str, tuple[int, int], dict]]:
    """(name, weight shape, group options without params); options empty for plain AdamW."""
    hidden, mlp, heads = (1024, 2752, 8) if small else (4096, 11008, 32)
    rank = 32 if small else 128
    return [
        (f"q {hidden}x{hidden} cross_head r{rank} +1.2% residual", (hidden, hidden),
         dict(rank=rank, projector="cross_head", num_heads=heads, residual_ratio=0.012, residual_warmup=1,
              update_proj_gap=200)),
        (f"mlp {mlp}x{hidden} randomized r{rank}", (mlp, hidden), dict(rank=rank, update_proj_gap=200)),
        (f"plain AdamW {hidden}x{hidden}", (hidden, hidden), {}),
    ]


def measure(shape: tuple[int, int], options: dict, steps: int) -> dict[int, tuple[float, int, int]]:
    """bits -> (median step seconds, allocated state bytes, estimated state bytes) of one weight.

    The 32-bit and 8-bit optimizers step alternately on identical weights and gradients, so both
    see the same load of a shared machine.
    """
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(shape, generator=generator) * 0.02
    grads = [torch.randn(shape, generator=generator) for _ in range(2)]
    weights, groups, optimizers, times = {}, {}, {}, {}
    for bits in (32, 8):
        weights[bits] = torch.nn.Parameter(start.clone())
        groups[bits] = [{"params": [weights[bits]], **options}]
        optimizers[bits] = GaLorePlusAdamW(groups[bits], lr=1e-3, optim_bits=bits)
        times[bits] = []
    for step in range(steps + 2):
        for bits in (32, 8):
            weights[bits].grad = grads[step % 2]
            seconds, _ = timed(optimizers[bits].step)
            if step >= 2:
                times[bits].append(seconds)
    return {
        bits: (statistics.median(times[bits]), tensor_bytes(list(optimizers[bits].state.values())),
               optimizer_state_bytes(groups[bits], bits))
        for bits in (32, 8)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="1024-wide shapes instead of LLaMA-2-7B's")
    parser.add_argument("--steps", type=int, default=5, help="timed steady-state steps per case (median)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (bitsandbytes' CPU code shares the pool)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.steps} steps")
    print("| case | state 32-bit MiB | state 8-bit MiB | state ratio 8/32 | step 32-bit ms | step 8-bit ms | time ratio 8/32 |")
    print("|---|---|---|---|---|---|---|")
    target = None
    for name, shape, options in cases(args.small):
        results = measure(shape, options, args.steps)
        for bits, (_, allocated, estimated) in results.items():
            assert allocated == estimated, f"{name} {bits}-bit: allocated {allocated} != estimated {estimated}"
        (t32, s32, _), (t8, s8, _) = results[32], results[8]
        print(f"| {name} | {s32 / MIB:.3f} | {s8 / MIB:.3f} | {s8 / s32:.3f} | {t32 * 1e3:.1f} | {t8 * 1e3:.1f} "
              f"| {t8 / t32:.2f} |", flush=True)
        if not args.small and "cross_head" in name:
            target = s8
    if target is not None:
        verdict = "meets" if target <= TARGET_MIB * MIB else "misses"
        print(f"\ntarget: 8-bit state of the 4096x4096 cross_head weight with 1.2% residual = {target / MIB:.3f} MiB "
              f"({target} bytes): {verdict} the {TARGET_MIB:g} MiB target")


if __name__ == "__main__":
    main()
