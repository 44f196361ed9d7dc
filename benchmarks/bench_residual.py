"""Benchmark of the sparsely coded residual (issue 3). Not a test: prints measurements.

Part 1 (``--part memory``): one 4096 x 4096 weight at rank 128 with residual_ratio 0.012: bytes of
its whole optimizer state, and the step time with and without the residual (both modes).

Part 2 (``--part error``): real gradients of the q/k projections of a small LLaMA (``benchmarks.models``' ``base2``:
2 layers, hidden 256, 8 heads; random init, byte-level windows of this Python's standard-library sources from
``benchmarks.text_data``) trained with AdamW; the same gradient
sequence is fed to GaLorePlusAdamW (lr 1, no decay, scale 1) and to torch AdamW, and the relative
error ||U - U_adamw|| / ||U_adamw|| of the update is reported for svd / randomized / cross_head bases,
without residual and with both residual modes (the analogue of GaLore+ Figure 2b).

Part 3 (``--part train``): the same LLaMA trained with GaLorePlusAdamW (groups from make_param_groups:
cross_head with the residual on q/k), loss on held-out files without residual and per mode.

    python -m benchmarks.bench_residual                 # all three parts
    python -m benchmarks.bench_residual --part memory --steps 9 --threads 2
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

from galore_plus import GaLorePlusAdamW
from galore_plus.sparse_residual.index import flat_index

from .measure import tensor_bytes, timed
from .models import MODEL_SIZES, build_model, heldout_loss, next_byte_loss
from .text_data import eval_windows, sample_batch, stdlib_source_bytes, stdlib_source_splits

MIB = 2**20
MODEL = "base2"
SEQ_LEN, BATCH = 128, 8


def timed_step(opt: torch.optim.Optimizer, weight: torch.nn.Parameter, grad: torch.Tensor) -> float:
    weight.grad = grad
    return timed(opt.step)[0]


def memory_and_time(size: int, rank: int, ratio: float, steps: int) -> None:
    """State bytes and median step time of one size x size weight, residual off / exact / paper."""
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(size, size, generator=generator) for _ in range(2)]
    variants = {"no residual": 0.0, "exact": ratio, "paper": ratio}
    runs = {}
    for name, variant_ratio in variants.items():
        weight = torch.nn.Parameter(torch.zeros(size, size))
        mode = "paper" if name == "paper" else "exact"
        opt = GaLorePlusAdamW([dict(params=[weight], rank=rank, update_proj_gap=10**6, residual_ratio=variant_ratio,
                                    residual_warmup=1, residual_mode=mode)], lr=1e-3)
        refresh = timed_step(opt, weight, grads[0])
        runs[name] = (weight, opt, refresh)
    times = {name: [] for name in variants}
    for step in range(steps):
        for name, (weight, opt, _) in runs.items():
            times[name].append(timed_step(opt, weight, grads[step % 2]))
    print(f"## {size} x {size} weight, rank {rank}, residual_ratio {ratio} (|I| = {math.ceil(ratio * size * size)})")
    print(f"torch threads: {torch.get_num_threads()}; median of {steps} steps, variants interleaved; "
          "step 1 (basis + index selection) excluded")
    print(f"AdamW state for comparison: {2 * size * size * 4 / MIB:.2f} MiB")
    base = statistics.median(times["no residual"])
    print("| variant | state MiB | residual state MiB | step 1 s | median step s | added time |")
    print("|---|---|---|---|---|---|")
    for name, (weight, opt, refresh) in runs.items():
        state = opt.state[weight]
        residual = tensor_bytes({key: value for key, value in state.items() if key.startswith("residual_")})
        median = statistics.median(times[name])
        print(f"| {name} | {tensor_bytes(state) / MIB:.3f} | {residual / MIB:.3f} | {refresh:.3f} | {median:.4f} | "
              f"{100 * (median / base - 1):+.1f}% |")


def qk_gradients(train_steps: int, record_steps: int) -> tuple[dict[str, list[torch.Tensor]], int]:
    """Gradients of every q_proj/k_proj weight over the last ``record_steps`` of an AdamW run."""
    model = build_model(MODEL, SEQ_LEN, seed=0)
    train = stdlib_source_bytes(2_000_000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    names = [n for n, _ in model.named_parameters() if n.endswith(("q_proj.weight", "k_proj.weight"))]
    recorded: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    generator = torch.Generator().manual_seed(1)
    for step in range(train_steps):
        loss = next_byte_loss(model, sample_batch(train, BATCH, SEQ_LEN, generator))
        opt.zero_grad()
        loss.backward()
        if step >= train_steps - record_steps:
            params = dict(model.named_parameters())
            for n in names:
                recorded[n].append(params[n].grad.detach().clone())
        opt.step()
    print(f"LLaMA {MODEL} {MODEL_SIZES[MODEL]} (hidden, layers, heads, MLP), AdamW lr 1e-3, batch {BATCH} x {SEQ_LEN} "
          f"bytes; final training loss {loss.item():.3f} nats/byte after {train_steps} steps")
    return recorded, model.config.num_attention_heads


def held_out_losses(rank: int, ratio: float, warmup: int, gap: int, steps: int, lr: float) -> None:
    """Train the LLaMA with GaLorePlusAdamW (cross_head on q/k) and report the held-out loss per residual mode."""
    from galore_plus import make_param_groups

    train, validation, _ = stdlib_source_splits(2_000_000, 200_000)
    windows = eval_windows(validation, SEQ_LEN, 128)
    print(f"LLaMA {MODEL} trained {steps} steps, lr {lr}, batch {BATCH} x {SEQ_LEN} bytes, rank {rank}, "
          f"update_proj_gap {gap}; q/k: cross_head with the residual, other linear layers: randomized; "
          f"held-out loss on {windows.shape[0]} windows of other stdlib files")
    print("| residual | held-out loss (nats/byte) | train time s |")
    print("|---|---|---|")
    for mode, mode_ratio in (("none", 0.0), ("exact", ratio), ("paper", ratio)):
        model = build_model(MODEL, SEQ_LEN, seed=0)
        groups = make_param_groups(model, rank=rank, update_proj_gap=gap, residual_ratio=mode_ratio,
                                   residual_warmup=warmup, residual_mode="paper" if mode == "paper" else "exact")
        opt = GaLorePlusAdamW(groups, lr=lr)
        generator = torch.Generator().manual_seed(1)

        def train_step() -> None:
            loss = next_byte_loss(model, sample_batch(train, BATCH, SEQ_LEN, generator))
            opt.zero_grad()
            loss.backward()
            opt.step()

        elapsed, _ = timed(train_step, steps)
        print(f"| {mode} | {heldout_loss(model, windows, BATCH):.4f} | {elapsed:.1f} |")


def updates_of(opt: torch.optim.Optimizer, weight: torch.nn.Parameter, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The update U_t = W_{t-1} - W_t of every step (lr 1, no weight decay)."""
    updates = []
    for grad in grads:
        before = weight.detach().clone()
        weight.grad = grad.clone()
        opt.step()
        updates.append(before - weight.detach())
    return updates


def relative_errors(approx: list[torch.Tensor], exact: list[torch.Tensor], index: torch.Tensor | None = None) -> list[float]:
    """||a - e|| / ||e|| per step, on the whole matrix or only at the flat positions ``index``."""
    if index is not None:
        approx, exact = [a.view(-1)[index] for a in approx], [e.view(-1)[index] for e in exact]
    return [float((a - e).norm() / e.norm()) for a, e in zip(approx, exact)]


def update_errors(rank: int, ratio: float, warmup: int, gap: int, train_steps: int, record_steps: int) -> None:
    """Relative error of GaLore+ updates against AdamW's on the recorded gradients, after the warmup."""
    recorded, heads = qk_gradients(train_steps, record_steps)
    projectors = {"svd": dict(projector="svd"), "randomized": dict(projector="randomized"),
                  "cross_head": dict(projector="cross_head", num_heads=heads)}
    residuals = {"none": dict(), "exact": dict(residual_ratio=ratio, residual_mode="exact"),
                 "paper": dict(residual_ratio=ratio, residual_mode="paper")}
    last = min(10, record_steps - warmup)
    print(f"rank {rank}, residual_ratio {ratio}, residual_warmup {warmup}, update_proj_gap {gap}, scale 1; "
          f"{len(recorded)} q/k weights of shape {tuple(next(iter(recorded.values()))[0].shape)}")
    print(f"relative error ||U - U_adamw|| / ||U_adamw||: mean over steps {warmup + 1}..{record_steps} (all), "
          f"over the last {last} steps (last), and over the last {last} steps only at the index set I (at I)")
    print("| basis | residual | all | last | at I | step time vs none |")
    print("|---|---|---|---|---|---|")
    for basis_name, basis_options in projectors.items():
        errors: dict[str, list[list[float]]] = {name: [[], [], []] for name in residuals}
        seconds = dict.fromkeys(residuals, 0.0)
        for grads in recorded.values():
            reference_weight = torch.nn.Parameter(torch.zeros_like(grads[0]))
            reference = torch.optim.AdamW([reference_weight], lr=1.0, weight_decay=0.0)
            exact_updates = updates_of(reference, reference_weight, grads)
            runs = {}
            for residual_name, residual_options in residuals.items():
                weight = torch.nn.Parameter(torch.zeros_like(grads[0]))
                opt = GaLorePlusAdamW([dict(params=[weight], rank=rank, update_proj_gap=gap, scale=1.0,
                                            residual_warmup=warmup, **basis_options, **residual_options)],
                                      lr=1.0, weight_decay=0.0)
                elapsed, runs[residual_name] = timed(lambda: updates_of(opt, weight, grads))
                seconds[residual_name] += elapsed
                if residual_name == "exact":
                    state = opt.state[weight]
                    index = flat_index(state["residual_row_ptr"], state["residual_col"], grads[0].shape[1])
            for residual_name, updates in runs.items():
                errors[residual_name][0] += relative_errors(updates[warmup:], exact_updates[warmup:])
                errors[residual_name][1] += relative_errors(updates[-last:], exact_updates[-last:])
                errors[residual_name][2] += relative_errors(updates[-last:], exact_updates[-last:], index)
        for residual_name, (every, final, at_index) in errors.items():
            print(f"| {basis_name} | {residual_name} | {statistics.mean(every):.4f} | {statistics.mean(final):.4f} | "
                  f"{statistics.mean(at_index):.4f} | {100 * (seconds[residual_name] / seconds['none'] - 1):+.0f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["memory", "error", "train", "all"], default="all")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 by default: on a shared, loaded machine more threads time contention)")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.012)
    parser.add_argument("--steps", type=int, default=9, help="timed steps per variant in part 1")
    parser.add_argument("--error-rank", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--gap", type=int, default=20)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--record-steps", type=int, default=40)
    parser.add_argument("--fit-steps", type=int, default=300, help="training steps per residual mode in part 3")
    parser.add_argument("--fit-lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("memory", "all"):
        memory_and_time(args.size, args.rank, args.ratio, args.steps)
    if args.part in ("error", "all"):
        update_errors(args.error_rank, args.ratio, args.warmup, args.gap, args.train_steps, args.record_steps)
    if args.part in ("train", "all"):
        held_out_losses(args.error_rank, args.ratio, args.warmup, 50, args.fit_steps, args.fit_lr)


if __name__ == "__main__":
    main()
