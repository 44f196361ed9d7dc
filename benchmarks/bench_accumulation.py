"""Per-layer accumulation in the subspace against ordinary accumulation on a small LLaMA: held-out loss over seeds.

Each update is ``--micro-batches`` micro-batches of ``--batch`` x ``--seq-len`` bytes of this Python's
standard-library sources (each loss divided by their count), clipped at ``--max-grad-norm``, with a
linear warm-up and cosine schedule stepped once per update. Both modes use the same GaLore+ groups
(``make_param_groups``: cross_head with the sparse residual on q/k, randomized elsewhere, Fira's
full-rank residual on) and see the same micro-batches and initial weights for a seed:

* ``ordinary``: k backward passes into ``.grad``, ``clip_grad_norm_``, ``optimizer.step()``;
* ``per-layer``: ``enable_per_layer_steps(optimizer, accumulation_steps=k)``, ``handle.clip_grad_norm_``,
  ``optimizer.step()`` (:mod:`galore_plus.step.accumulate`: refresh from the first micro-batch, Fira's term lagged).

Reported: test-split loss per seed and mode, the mean and the spread over seeds, and the per-seed
difference. Not a test: prints measurements (docs/memory.md records them).

    python -m benchmarks.bench_accumulation                       # small model, 3 seeds
    python -m benchmarks.bench_accumulation --full-rank-residual off
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from galore_plus import GaLorePlusAdamW, make_param_groups
from galore_plus.per_layer import enable_per_layer_steps

from .models import build_model, heldout_loss, next_byte_loss
from .text_data import eval_windows, sample_batch, stdlib_source_splits
from .training import cosine_schedule

MODES = ("ordinary", "per-layer")


def train(mode: str, seed: int, args: argparse.Namespace, train_data: torch.Tensor, test_windows: torch.Tensor) -> float:
    """Train one run and return its test loss (nats per byte)."""
    model = build_model(args.model, args.seq_len + 1, seed)
    groups = make_param_groups(model, rank=args.rank, update_proj_gap=args.gap, residual_ratio=args.residual_ratio,
                               residual_warmup=args.residual_warmup, weight_decay=0.0,
                               full_rank_residual=args.full_rank_residual == "on")
    optimizer = GaLorePlusAdamW(groups, lr=args.lr, seed=seed)
    warmup = max(1, args.updates // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_schedule(step, warmup, args.updates))
    handle = enable_per_layer_steps(optimizer, accumulation_steps=args.micro_batches) if mode == "per-layer" else None
    generator = torch.Generator().manual_seed(seed)
    for _ in range(args.updates):
        for _ in range(args.micro_batches):
            batch = sample_batch(train_data, args.batch, args.seq_len, generator)
            (next_byte_loss(model, batch) / args.micro_batches).backward()
        if handle is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        else:
            handle.clip_grad_norm_(args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return heldout_loss(model, test_windows, 16)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_accumulation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--gap", type=int, default=20)
    parser.add_argument("--residual-ratio", type=float, default=0.012)
    parser.add_argument("--residual-warmup", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--full-rank-residual", choices=["on", "off"], default="on",
                        help="Fira's full-rank residual on every projected group (default on, as make_param_groups)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_data, _, test_data = stdlib_source_splits(2_000_000, 200_000)
    test_windows = eval_windows(test_data, args.seq_len, 256)
    print(f"{args.model} model, {args.updates} updates of {args.micro_batches} x {args.batch} x {args.seq_len} bytes, "
          f"rank {args.rank}, gap {args.gap}, lr {args.lr}, clip {args.max_grad_norm}, full-rank residual "
          f"{args.full_rank_residual}, seeds {args.seeds}")
    losses: dict[str, list[float]] = {mode: [] for mode in MODES}
    for seed in args.seeds:
        for mode in MODES:
            start = time.perf_counter()
            losses[mode].append(train(mode, seed, args, train_data, test_windows))
            print(f"seed {seed} {mode}: test loss {losses[mode][-1]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    for mode in MODES:
        spread = statistics.stdev(losses[mode]) if len(losses[mode]) > 1 else float("nan")
        print(f"{mode}: mean {statistics.mean(losses[mode]):.4f}, std over seeds {spread:.4f}")
    differences = [b - a for a, b in zip(*losses.values())]
    print("per-layer - ordinary per seed: " + ", ".join(f"{d:+.4f}" for d in differences)
          + f"; mean {statistics.mean(differences):+.4f}")


if __name__ == "__main__":
    main()
