"""Fine-tuning steps of a LLaMA-2-7B-shaped bfloat16 model on this machine, measured against the memory estimator.

    python -m benchmarks.fit_7b                         # GaLore+ 8-bit, per-layer steps, 3 steps of 1 x 32 tokens
    python -m benchmarks.fit_7b --tokens 32 512         # plus one (non-refresh) step at 512 tokens
    python -m benchmarks.fit_7b --method galore+32      # any row of the estimator: adamw32, apollo8, ... (--help)
    python -m benchmarks.fit_7b --config tiny.json      # any transformers config with model_type
    python -m benchmarks.fit_7b --threads 1             # one torch thread (faster on a loaded machine)
    python -m benchmarks.fit_7b --steps 2 --tokens 512 --micro-batches 4 --max-grad-norm 1.0
                                                        # per-layer accumulation of 4 micro-batches, clipping

Before anything is built, ``galore_plus.memory`` estimates parameters + gradients + optimizer state
of the chosen method; a method whose estimate exceeds ``--budget-gib`` (default: the machine's
memory) is refused with the estimate in the message. The model is then built on the meta device
and each parameter materialised directly in bfloat16 (normal(0, initializer_range) for matrices,
ones for norm weights), so no float32 copy of the weights ever exists. Training uses gradient
checkpointing and, unless ``--no-per-layer``, per-layer steps; every step uses the same random
token batch, so the loss should go down.

Per step: wall time split into forward+backward, optimizer without refreshes and projector
refreshes (the optimizer's time is measured by gradient hooks around the per-layer steps, the
refresh time by wrapping ``compute_basis``); peak resident memory (VmHWM, reset at the start of the
step) and tensor bytes (parameters, the largest amount of live gradients, optimizer state) beside
the estimate. After the steps, in the same process: the time of the rank-r projection products
alone (G Q^T and N Q, or P^T G and P N, float32, for every projected weight's shape), and the
refresh time of one decoder layer's weights with ``svd`` and with GaLore+'s projectors, scaled by
the layer count. Results go to ``--out`` (Markdown and JSON).

With ``--micro-batches k`` (k > 1) or ``--max-grad-norm`` > 0, per-layer steps accumulate in the
subspace (``enable_per_layer_steps(optimizer, accumulation_steps=k)``, :mod:`galore_plus.step.accumulate`):
each step is k forward+backward passes of ``--batch`` x tokens (micro-batch i uses the token seed
``--seed`` + i, the same in every step), each loss divided by k, then clipping
(``handle.clip_grad_norm_``; ``clip_grad_norm_`` with ``--no-per-layer``) and ``optimizer.step()``.
The accumulators' bytes, measured just before each boundary, are recorded beside the estimator's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from galore_plus import GaLorePlusAdamW
from galore_plus import memory
from galore_plus.memory import GIB, MemoryEstimate, build_meta_model, estimate_memory, load_config, method_groups
from galore_plus.per_layer import PerLayerSteps, enable_per_layer_steps

from .measure import RefreshTimer, best_seconds, tensor_bytes
from .resident import machine_memory_bytes, peak_resident_bytes, reset_peak_resident, resident_bytes



def command_line_name(method: str, bits: int) -> str:
    """``--method`` of a row of ``galore_plus.memory.METHODS``: ``galore+8``, ``adamw32``, ``apollo-mini8``, ..."""
    return method.lower().removesuffix(" 8-bit").replace(" ", "_") + str(bits)


# command-line name -> (method name, optimizer bits): the rows of the memory estimator's table
METHODS: dict[str, tuple[str, int]] = {command_line_name(method, bits): (method, bits)
                                       for method, bits, _ in memory.METHODS}
DTYPE = torch.bfloat16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    total, _ = machine_memory_bytes()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fit_7b", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", help="a config of galore_plus.memory: llama2-7b (default), llama2-13b, tinyllama-1.1b")
    parser.add_argument("--config", help="a JSON file of transformers config fields including model_type")
    parser.add_argument("--method", default="galore+8", choices=sorted(METHODS), help="default galore+8")
    parser.add_argument("--no-per-layer", action="store_true", help="ordinary optimizer.step() after backward")
    parser.add_argument("--steps", type=int, default=3, help="steps at the first --tokens (default 3; step 1 refreshes)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[32],
                        help="tokens per sequence; each further value adds one step at that length (default 32)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per batch (default 1)")
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="micro-batches (of --batch sequences) accumulated per step (default 1)")
    parser.add_argument("--max-grad-norm", type=float, default=0.0, help="clip each step's gradient norm (default 0: off)")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--residual-ratio", type=float, default=0.012, help="GaLore+ residual on q/k (default 0.012)")
    parser.add_argument("--residual-warmup", type=int, default=1,
                        help="steps before the residual index set is chosen (default 1, so that steps 2+ hold the "
                             "steady-state optimizer state the estimator counts; training default is 10)")
    parser.add_argument("--full-rank-residual", choices=["on", "off"],
                        help="Fira's full-rank residual on projected groups (default: the groups' own default, "
                             "on for GaLore+'s cross_head/randomized projectors)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--budget-gib", type=float, default=total / GIB,
                        help=f"refuse methods whose estimate exceeds this (default: this machine, {total / GIB:.1f})")
    parser.add_argument("--skip-refresh-comparison", action="store_true",
                        help="skip the svd vs GaLore+ refresh timing of one decoder layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/results/fit_7b",
                        help="directory of the Markdown and JSON (default docs/results/fit_7b)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int,
                        help="torch.set_num_threads for the whole run (default: torch's choice). On a loaded machine "
                             "1 can be much faster: every parallel operation waits for all its OpenMP threads")
    args = parser.parse_args(argv)
    args.full_rank_residual = {None: None, "on": True, "off": False}[args.full_rank_residual]
    if args.model is None and args.config is None:
        args.model = "llama2-7b"
    if (args.steps < 1 or min(args.tokens) < 2 or args.batch < 1 or args.micro_batches < 1
            or (args.threads is not None and args.threads < 1)):
        parser.error("--steps, --batch, --micro-batches and --threads must be >= 1 and --tokens >= 2")
    return args


def training_groups(model: nn.Module, method: str, rank: int, residual_ratio: float, residual_warmup: int,
                    full_rank_residual: bool | None = None) -> list[dict]:
    """``galore_plus.memory``'s parameter groups of a method, with the residual warmup set on the groups that have
    a sparse residual and, unless None (the groups' default: on for GaLore+'s projectors), ``full_rank_residual``
    on projected groups."""
    groups = method_groups(model, method, rank, residual_ratio)
    for group in groups:
        if group.get("residual_ratio", 0.0) > 0:
            group["residual_warmup"] = residual_warmup
        if "rank" in group and full_rank_residual is not None:
            group["full_rank_residual"] = full_rank_residual
    return groups


def accumulation_steps(args: argparse.Namespace) -> int | None:
    """``accumulation_steps`` of the per-layer steps: --micro-batches when accumulating or clipping, else None."""
    if args.no_per_layer or (args.micro_batches == 1 and args.max_grad_norm <= 0):
        return None
    return args.micro_batches


def method_label(method: str, bits: int, rank: int, per_layer: bool) -> str:
    """E.g. ``GaLore+ 8-bit, rank 128, per-layer steps`` or ``AdamW 8-bit, ordinary steps``."""
    name = method if method.endswith("-bit") else f"{method} {bits}-bit"
    ranked = "" if method.startswith("AdamW") else f", rank {rank}"
    return f"{name}{ranked}, {'per-layer' if per_layer else 'ordinary'} steps"


def check_budget(config: Any, args: argparse.Namespace) -> MemoryEstimate:
    """The estimate of the chosen method on a meta-device model; raises SystemExit when it exceeds the budget."""
    method, bits = METHODS[args.method]
    meta = build_meta_model(config, DTYPE)
    estimate = estimate_memory(training_groups(meta, method, args.rank, args.residual_ratio, args.residual_warmup,
                                               args.full_rank_residual),
                               bits, per_layer=not args.no_per_layer, accumulation=accumulation_steps(args) is not None)
    if estimate.total > args.budget_gib * GIB:
        raise SystemExit(
            f"refused before building anything: {args.method} "
            f"({method_label(method, bits, args.rank, not args.no_per_layer)}) is estimated at {estimate.total / GIB:.2f} GiB "
            f"(parameters {estimate.parameters / GIB:.2f} + gradients {estimate.gradients / GIB:.2f} + optimizer state "
            f"{estimate.optimizer_state / GIB:.2f}), more than --budget-gib {args.budget_gib:.2f}, before activations")
    return estimate


def initial_value(name: str, shape: torch.Size, std: float, generator: torch.Generator) -> Tensor:
    """A new bfloat16 tensor: normal(0, std) for matrices, ones for 1-D weights (norms), zeros for biases."""
    tensor = torch.empty(shape, dtype=DTYPE)
    if len(shape) >= 2:
        return tensor.normal_(0.0, std, generator=generator)
    return tensor.fill_(1.0 if name == "weight" else 0.0)


def build_model(config: Any, seed: int) -> nn.Module:
    """The causal LM of ``config`` in bfloat16, parameters created on the meta device and then initialised one at a time.

    Buffers (rotary frequencies) are built on the CPU as usual; tied parameters stay tied.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPE)
    generator = torch.Generator().manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    created: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in created:
                value = initial_value(name, param.shape, std, generator)
                created[id(param)] = nn.Parameter(value, requires_grad=param.requires_grad)
            setattr(module, name, created[id(param)])
    model.config.use_cache = False
    enable_checkpointing(model)
    model.train()
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant gradient (activation) checkpointing of every decoder layer, under either transformers name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class OptimizerClock:
    """Seconds spent in per-layer optimizer steps during backward (also: those of the ``projected`` parameters
    alone), the most gradient bytes alive at once, and how much of the step's peak resident memory (VmHWM) was
    reached inside those steps.

    Gradient hooks run in registration order: :meth:`attach_before` (called before
    ``enable_per_layer_steps``) starts the clock on a parameter, :meth:`attach_after` stops it after
    that parameter's per-layer step. ``on_step_end`` (e.g. a progress bar) is called after each.
    """

    def __init__(self, params: list[Tensor], projected: list[Tensor] = ()):
        self.params = params
        self.projected = {id(param) for param in projected}
        self.steps_in_hooks = False  # set by attach_hooks: whether per-layer steps run between the clock's hooks
        self.on_step_end = None
        self._handles: list = []
        self.reset()

    def attach_before(self) -> None:
        self._handles += [param.register_post_accumulate_grad_hook(self._start) for param in self.params]

    def attach_after(self) -> None:
        self._handles += [param.register_post_accumulate_grad_hook(self._stop) for param in self.params]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _start(self, param: Tensor) -> None:
        live = sum(p.grad.nbytes for p in self.params if type(p.grad) is Tensor)
        self.peak_grad_bytes = max(self.peak_grad_bytes, live)
        self._peak_before = peak_resident_bytes()
        self._started = time.perf_counter()

    def _stop(self, param: Tensor) -> None:
        seconds = time.perf_counter() - self._started
        self.seconds += seconds
        if id(param) in self.projected:
            self.projected_seconds += seconds
        growth = peak_resident_bytes() - self._peak_before
        self.peak_growth_in_optimizer += growth
        if growth > self.largest_growth[0]:
            self.largest_growth = (growth, tuple(param.shape))
        if self.on_step_end is not None:
            self.on_step_end()

    def reset(self) -> None:
        self.seconds, self.projected_seconds, self.peak_grad_bytes, self.peak_growth_in_optimizer = 0.0, 0.0, 0, 0
        self.largest_growth: tuple[int, tuple[int, ...]] = (0, ())
        self._started, self._peak_before = 0.0, 0


def attach_hooks(optimizer: GaLorePlusAdamW, clock: OptimizerClock, per_layer: bool,
                 accumulation: int | None = None) -> PerLayerSteps | None:
    """The clock's hooks around the per-layer steps (or around nothing, with ``per_layer`` False); ``accumulation``:
    their ``accumulation_steps``."""
    clock.attach_before()
    clock.steps_in_hooks = per_layer
    handle = enable_per_layer_steps(optimizer, accumulation_steps=accumulation) if per_layer else None
    clock.attach_after()
    return handle


def detach_hooks(clock: OptimizerClock, per_layer: PerLayerSteps | None) -> None:
    if per_layer is not None:
        per_layer.remove()
    clock.remove()


def token_batch(vocab_size: int, batch: int, tokens: int, seed: int) -> Tensor:
    """Uniformly random token ids (batch, tokens) from a seeded generator."""
    return torch.randint(vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def train_step(model: nn.Module, optimizer: GaLorePlusAdamW, clock: OptimizerClock, refresh: RefreshTimer,
               batches: list[Tensor], progress: bool, label: str, per_layer: PerLayerSteps | None = None,
               max_grad_norm: float = 0.0) -> dict[str, Any]:
    """Forward+backward of each micro-batch in ``batches`` (loss / their count), clipping, one step; times, loss,
    peak resident memory, tensor bytes and (per-layer accumulation) the accumulators' bytes of the step."""
    clock.reset()
    refresh_before, calls_before = refresh.seconds, refresh.calls
    reset_peak_resident()
    resident_at_start = resident_bytes()
    bar = tqdm(total=len(clock.params) * len(batches), desc=label, unit="param", disable=not progress, leave=True)
    clock.on_step_end = bar.update
    accumulating = per_layer is not None and per_layer.accumulation_steps is not None
    grad_norm = None
    start = time.perf_counter()
    with refresh.patched():
        loss = 0.0
        for batch in batches:
            micro_loss = model(input_ids=batch, labels=batch).loss / len(batches)
            micro_loss.backward()
            loss += micro_loss.item()
        step_start = time.perf_counter()
        accumulator_bytes = per_layer.accumulator_bytes() if accumulating else None
        if max_grad_norm > 0:
            clip = per_layer.clip_grad_norm_ if accumulating else torch.nn.utils.clip_grad_norm_
            grad_norm = float(clip(max_grad_norm) if accumulating else clip(model.parameters(), max_grad_norm))
        grads_after_backward = sum(p.grad.nbytes for p in clock.params if type(p.grad) is Tensor)
        optimizer.step()
        optimizer_tail = time.perf_counter() - step_start
        optimizer.zero_grad()
    wall = time.perf_counter() - start
    bar.close()
    optimizer_seconds = clock.seconds + optimizer_tail
    refresh_seconds = refresh.seconds - refresh_before
    return dict(
        tokens=batches[0].shape[1], micro_batches=len(batches), loss=loss, grad_norm=grad_norm,
        accumulator_bytes=accumulator_bytes, wall_s=wall, forward_backward_s=wall - optimizer_seconds,
        optimizer_s=optimizer_seconds - refresh_seconds, refresh_s=refresh_seconds, refreshes=refresh.calls - calls_before,
        projected_optimizer_s=clock.projected_seconds - refresh_seconds if clock.steps_in_hooks else None,
        peak_resident_bytes=peak_resident_bytes(), resident_at_start=resident_at_start, resident_at_end=resident_bytes(),
        peak_growth_in_optimizer=clock.peak_growth_in_optimizer, largest_growth_bytes=clock.largest_growth[0],
        largest_growth_shape=list(clock.largest_growth[1]), param_bytes=sum(p.nbytes for p in model.parameters()),
        grad_bytes=max(clock.peak_grad_bytes, grads_after_backward),
        state_bytes=tensor_bytes(list(optimizer.state.values())),
    )


def projected_shapes(optimizer: GaLorePlusAdamW) -> Counter:
    """How many projected weights have each (gradient shape, basis shape), from the optimizer's groups and state."""
    shapes: Counter = Counter()
    for group in optimizer.param_groups:
        if "rank" not in group:
            continue
        for param in group["params"]:
            basis = optimizer.state[param].get("projector")
            if basis is not None:
                shape = tuple(param.shape[::-1]) if group["transposed"] else tuple(param.shape)
                shapes[(shape, tuple(basis.shape))] += 1
    return shapes


PRODUCTS_LABEL = "R and U, 4 m n r flops per weight"


def projection_product_seconds(shapes: Counter, repeats: int = 3) -> float:
    """Time of the rank-r products of one step for all projected weights (best of ``repeats`` per shape).

    Right side (basis Q, r x n): R = G Q^T and U = N Q; left side (P, m x r): R = P^T G and U = P N;
    float32, as the optimizer computes them. These are the two products of every step, with or without
    Fira's full-rank residual (whose update is applied with the same back-projection, and whose norm
    comes from low-rank terms: :mod:`galore_plus.rules.fira`). Full-size results go into one
    buffer per shape that the first repeat has already touched, so the time is the products'
    arithmetic, not page faults of new full-size tensors (which made this reference vary by 2x
    between runs on a nearly full machine).
    """
    total = 0.0
    for (shape, basis_shape), count in shapes.items():
        grad, basis, full_size = torch.randn(shape), torch.randn(basis_shape), torch.empty(shape)
        right = basis_shape[1] == shape[1] and basis_shape[0] != shape[0]

        def products() -> Tensor:
            low_rank = grad @ basis.t() if right else basis.t() @ grad
            return torch.mm(low_rank, basis, out=full_size) if right else torch.mm(basis, low_rank, out=full_size)

        total += count * best_seconds(products, repeats)[0]
    return total


def layer_refresh_seconds(model: nn.Module, config: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Refresh time of the last decoder layer's projected weights with svd (GaLore) and with GaLore+'s projectors.

    Only that layer's projected weights get gradients (one forward+backward at the first --tokens);
    each method then takes one 32-bit ``step`` of a fresh optimizer with lr 0 over them (which
    refreshes every basis and leaves the weights unchanged), timed by wrapping ``compute_basis``.
    """
    prefix = f".layers.{config.num_hidden_layers - 1}."
    names = {id(p): name for name, p in model.named_parameters()}
    plan = training_groups(model, "GaLore+", args.rank, args.residual_ratio, args.residual_warmup)
    chosen = {id(p) for group in plan if "rank" in group for p in group["params"] if prefix in names[id(p)]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    for param in model.parameters():
        param.requires_grad_(id(param) in chosen)
    batch = token_batch(config.vocab_size, args.batch, args.tokens[0], args.seed)
    model(input_ids=batch, labels=batch).loss.backward()
    result: dict[str, Any] = {"layer": config.num_hidden_layers - 1, "weights": len(chosen)}
    for label, method in (("svd", "GaLore"), ("galore_plus", "GaLore+")):
        groups = [dict(group, params=[p for p in group["params"] if id(p) in chosen])
                  for group in training_groups(model, method, args.rank, args.residual_ratio, args.residual_warmup)
                  if "rank" in group]
        optimizer = GaLorePlusAdamW([group for group in groups if group["params"]], lr=0.0, weight_decay=0.0)
        timer = RefreshTimer(torch.device("cpu"))
        with timer.patched():
            optimizer.step()
        result[f"{label}_s"], result[f"{label}_refreshes"] = timer.seconds, timer.calls
        del optimizer
    for param in model.parameters():
        param.grad = None
        param.requires_grad_(id(param) in trainable)
    return result


def gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def markdown_report(record: dict[str, Any]) -> str:
    """The Markdown page of one run."""
    estimate = record["estimate"]
    lines = [
        f"# {record['model']}: {record['method']} "
        f"({method_label(record['method_name'], record['bits'], record['rank'], record['per_layer'])})",
        "",
        f"Command: `{record['command']}`  ",
        f"{record['date']}, {record['machine']}; torch {record['torch']}, {record['threads']} threads; "
        f"load average {record['load_before']} before, {record['load_after']} after.",
        "",
        f"{record['parameters'] / 1e9:.2f} B parameters in bfloat16, batch {record['batch']}, gradient checkpointing. "
        f"Built in {record['build_s']:.0f} s; resident {gib(record['resident_before_build'])} GiB before building, "
        f"{gib(record['resident_after_build'])} GiB after (peak while building {gib(record['peak_build'])} GiB).",
        "",
        f"Estimate (`galore_plus.memory`): parameters {gib(estimate['parameters'])} + gradients "
        f"{gib(estimate['gradients'])} + optimizer state {estimate['optimizer_state'] / GIB:.3f}"
        + (f" + accumulators {estimate['accumulators'] / GIB:.3f}" if estimate.get("accumulators") else "")
        + f" = **{gib(estimate['total'])} GiB** (budget {record['budget_gib']:.1f} GiB).",
        "",
        "| step | tokens | loss | wall s | fwd+bwd s | optimizer s (no refresh) | refresh s (count) | peak resident GiB "
        "| params GiB | peak live grads GiB | optimizer state GiB | tensors GiB | estimate / tensors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for index, step in enumerate(record["steps"], 1):
        tensors = step["param_bytes"] + step["grad_bytes"] + step["state_bytes"] + (step.get("accumulator_bytes") or 0)
        lines.append(
            f"| {index} | {step['tokens']} | {step['loss']:.4f} | {step['wall_s']:.1f} | {step['forward_backward_s']:.1f} "
            f"| {step['optimizer_s']:.1f} | {step['refresh_s']:.1f} ({step['refreshes']}) "
            f"| {gib(step['peak_resident_bytes'])} | {gib(step['param_bytes'])} | {gib(step['grad_bytes'])} "
            f"| {step['state_bytes'] / GIB:.3f} | {gib(tensors)} | {estimate['total'] / tensors:.3f} |")
    lines += ["", f"Peak resident memory of the whole process: **{gib(record['peak_resident_bytes'])} GiB**."]
    if record.get("micro_batches", 1) > 1 or record.get("max_grad_norm", 0) > 0:
        lines += ["", f"{record['micro_batches']} micro-batches per step, clipping at {record['max_grad_norm']:g} "
                      f"(per-layer accumulation_steps={record['accumulation_steps']}). Per step: gradient norm before "
                      "clipping, accumulators measured before the boundary (estimate "
                      f"{estimate.get('accumulators', 0) / GIB:.3f} GiB):", "",
                  "| step | grad norm | accumulators GiB |", "|---|---|---|"]
        for index, step in enumerate(record["steps"], 1):
            norm, held = step.get("grad_norm"), step.get("accumulator_bytes")
            lines.append(f"| {index} | {'-' if norm is None else f'{norm:.4f}'} | "
                         f"{'-' if held is None else f'{held / GIB:.3f}'} |")
    if "resident_at_start" in record["steps"][0]:
        lines += ["", "Where each step's peak was reached: resident at the start of the step, plus the growth of the peak "
                      "(VmHWM) inside the per-layer optimizer steps (largest single one and its weight shape), plus the "
                      "rest (forward, backward, activations):", "",
                  "| step | resident at start GiB | peak growth in optimizer steps GiB (largest, shape) "
                  "| peak growth elsewhere GiB | peak GiB | resident at end GiB |", "|---|---|---|---|---|---|"]
        for index, step in enumerate(record["steps"], 1):
            elsewhere = step["peak_resident_bytes"] - step["resident_at_start"] - step["peak_growth_in_optimizer"]
            lines.append(
                f"| {index} | {gib(step['resident_at_start'])} | {gib(step['peak_growth_in_optimizer'])} "
                f"({gib(step['largest_growth_bytes'])}, {'x'.join(map(str, step['largest_growth_shape'])) or '-'}) "
                f"| {gib(elsewhere)} | {gib(step['peak_resident_bytes'])} | {gib(step['resident_at_end'])} |")
    if not record["complete"]:
        lines += ["", "**Incomplete run**: stopped or still running after the steps above."]
    products = record.get("projection_products_s")
    if products is not None:
        counted = record.get("projection_products", PRODUCTS_LABEL)
        lines += ["", f"Rank-{record['rank']} projection products alone ({counted}; float32, every projected weight's "
                      f"shape, measured after the steps): {products:.1f} s per step. Optimizer time without refreshes / "
                      "products: " + ", ".join(f"step {index} {step['optimizer_s'] / products:.2f}x"
                                               for index, step in enumerate(record["steps"], 1))
                      + ". Forward+backward / optimizer (no refresh): "
                      + ", ".join(f"{step['tokens']} tokens {step['forward_backward_s'] / step['optimizer_s']:.2f}"
                                  for step in record["steps"][1:] or record["steps"]) + "."]
        split = [(index, step) for index, step in enumerate(record["steps"], 1)
                 if step.get("projected_optimizer_s") is not None]
        if split:
            lines += ["", "Of the optimizer time without refreshes: projected weights alone / products: "
                          + ", ".join(f"step {index} {step['projected_optimizer_s'] / products:.2f}x" for index, step in split)
                          + "; plain tensors (embedding, output head, norms): "
                          + ", ".join(f"step {index} {step['optimizer_s'] - step['projected_optimizer_s']:.1f} s"
                                      for index, step in split) + "."]
    layer = record.get("layer_refresh")
    if layer is not None:
        layers = record["layers"]
        svd_scaled = layer["svd_s"] * layers
        lines += ["", f"Refresh of every projected weight of decoder layer {layer['layer']} ({layer['weights']} weights, "
                      "gradient of one forward+backward, 32-bit optimizer step):", "",
                  "| projectors | one layer s (measured) | all layers s |", "|---|---|---|",
                  f"| svd everywhere (GaLore) | {layer['svd_s']:.1f} | {svd_scaled:.0f} (one layer x {layers}, scaled) |",
                  f"| cross_head q/k + randomized (GaLore+) | {layer['galore_plus_s']:.2f} "
                  f"| {layer['galore_plus_s'] * layers:.1f} (one layer x {layers}, scaled) |"]
        first = record["steps"][0]
        if record["method_name"] == "GaLore+" and first["refreshes"]:
            lines.append(f"| GaLore+ in step 1, all {first['refreshes']} weights (measured) | | {first['refresh_s']:.1f} |")
            lines += ["", f"svd (scaled) / GaLore+ (measured in step 1): **{svd_scaled / first['refresh_s']:.1f}x**."]
    return "\n".join(lines) + "\n"


def save_record(record: dict[str, Any], out: Path) -> str:
    """Write the JSON and Markdown of a run (also after every step, so a stopped run keeps its steps); the Markdown."""
    record["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{record['model']}_{record['method']}{'' if record['per_layer'] else '_no_per_layer'}"
    if record.get("micro_batches", 1) > 1 or record.get("max_grad_norm", 0) > 0:
        stem += f"_accumulate{record['micro_batches']}_clip{record['max_grad_norm']:g}"
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    report = markdown_report(record)
    (out / f"{stem}.md").write_text(report)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = load_config(args.model, args.config)
    method, bits = METHODS[args.method]
    estimate = check_budget(config, args)
    progress = not args.quiet
    record: dict[str, Any] = dict(
        model=args.model or Path(args.config).stem, method=args.method, method_name=method, bits=bits, rank=args.rank,
        per_layer=not args.no_per_layer, batch=args.batch, budget_gib=args.budget_gib,
        command="python -m benchmarks.fit_7b " + " ".join(sys.argv[1:] if argv is None else argv),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
        threads=torch.get_num_threads(), machine=f"{platform.machine()} {os.cpu_count()} CPUs, "
        f"{machine_memory_bytes()[0] / GIB:.1f} GiB", load_before=" ".join(f"{x:.1f}" for x in os.getloadavg()),
        micro_batches=args.micro_batches, max_grad_norm=args.max_grad_norm, accumulation_steps=accumulation_steps(args),
        estimate=dict(parameters=estimate.parameters, gradients=estimate.gradients,
                      optimizer_state=estimate.optimizer_state, accumulators=estimate.accumulators,
                      total=estimate.total),
        available_before=machine_memory_bytes()[1], complete=False,
    )
    print(f"estimate {gib(estimate.total)} GiB fits --budget-gib {args.budget_gib:.1f}; building {record['model']} ...",
          flush=True)
    record["resident_before_build"] = resident_bytes()
    reset_peak_resident()
    start = time.perf_counter()
    model = build_model(config, args.seed)
    record["build_s"] = time.perf_counter() - start
    record["resident_after_build"], record["peak_build"] = resident_bytes(), peak_resident_bytes()
    record["peak_resident_bytes"] = record["peak_build"]
    record["parameters"] = sum(p.numel() for p in model.parameters())
    record["layers"] = config.num_hidden_layers
    print(f"built in {record['build_s']:.0f} s, resident {gib(record['resident_after_build'])} GiB", flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = training_groups(model, method, args.rank, args.residual_ratio, args.residual_warmup,
                                 args.full_rank_residual)
    optimizer = GaLorePlusAdamW(groups, lr=args.lr, optim_bits=bits, seed=args.seed)
    clock = OptimizerClock([p for p in model.parameters() if p.requires_grad],
                           [p for group in groups if "rank" in group for p in group["params"]])
    per_layer = attach_hooks(optimizer, clock, not args.no_per_layer, accumulation_steps(args))
    refresh = RefreshTimer(torch.device("cpu"))
    lengths = [args.tokens[0]] * args.steps + list(args.tokens[1:])
    record["steps"] = []
    out = Path(args.out)

    def run_steps(count: int) -> None:
        for _ in range(count):
            index = len(record["steps"]) + 1
            batches = [token_batch(config.vocab_size, args.batch, lengths[index - 1], args.seed + micro)
                       for micro in range(args.micro_batches)]
            step = train_step(model, optimizer, clock, refresh, batches, progress, f"step {index}/{len(lengths)}",
                              per_layer, args.max_grad_norm)
            record["steps"].append(step)
            record["peak_resident_bytes"] = max(record["peak_resident_bytes"], step["peak_resident_bytes"])
            print(f"step {index}: {step['tokens']} tokens, loss {step['loss']:.4f}, wall {step['wall_s']:.1f} s (fwd+bwd "
                  f"{step['forward_backward_s']:.1f}, optimizer {step['optimizer_s']:.1f}, refresh "
                  f"{step['refresh_s']:.1f}), peak resident {gib(step['peak_resident_bytes'])} GiB", flush=True)
            save_record(record, out)

    run_steps(args.steps)
    shapes = projected_shapes(optimizer)
    if shapes:
        record["projection_products_s"] = projection_product_seconds(shapes)
        record["projection_products"] = PRODUCTS_LABEL
        print(f"projection products alone: {record['projection_products_s']:.1f} s", flush=True)
        save_record(record, out)
        if not args.skip_refresh_comparison:
            detach_hooks(clock, per_layer)
            record["layer_refresh"] = layer_refresh_seconds(model, config, args)
            per_layer = attach_hooks(optimizer, clock, not args.no_per_layer, accumulation_steps(args))
            print(f"refresh of one layer: {record['layer_refresh']}", flush=True)
            save_record(record, out)
    run_steps(len(args.tokens) - 1)
    record["complete"] = True
    print(save_record(record, out))
    return record


if __name__ == "__main__":
    main()
