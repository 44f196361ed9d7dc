"""The training phases: the fine-tuning regime's cached pre-trained model, and one run per (method, lr, seed)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from galore_plus.adapters import adapter_loss, adapter_step

from .measure import RefreshTimer, synchronize, training_bytes
from .methods import MethodSpec, OptimSettings
from .models import build_model, heldout_loss, next_byte_loss
from .text_data import stdlib_source_bytes, stream_bytes, window_batches


@dataclass(frozen=True)
class Recipe:
    """GaLore's pre-training recipe: linear warm-up over a share of the steps, cosine decay to a share of the peak
    learning rate, gradient clipping (0: none)."""

    warmup_share: float = 0.1
    final_lr_share: float = 0.1
    clip: float = 1.0


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that determines the fine-tuning regime's pre-trained model; its hash names the cache file."""

    model_size: str
    seq_len: int
    steps: int
    batch_size: int
    lr: float
    recipe: Recipe
    seed: int
    python: str

    def cache_key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LoopSettings:
    """The training loop's settings, shared by every method and learning rate."""

    steps: int
    batch_size: int
    seq_len: int
    warmup_steps: int
    eval_every: int
    eval_batch_size: int
    final_lr_share: float
    clip: float


def cosine_schedule(step: int, warmup: int, total: int, final_share: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``final_share`` at
    ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final_share + (1.0 - final_share) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def scheduled(optimizer: torch.optim.Optimizer, warmup: int, total: int,
              final_share: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's learning-rate schedule on ``optimizer``, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, warmup, total, final_share))


def clip_gradients(model: nn.Module, max_norm: float) -> None:
    """Clip the global gradient norm to ``max_norm`` (torch's ``clip_grad_norm_``); 0 clips nothing."""
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def pretrained_state(
    settings: PretrainSettings, cache_dir: str, device: torch.device, progress: bool
) -> tuple[dict[str, Tensor], bool]:
    """(the pre-trained model's state dict, whether it came from the cache in ``cache_dir``).

    Trained and saved to the cache when it is not there yet.
    """
    path = os.path.join(cache_dir, f"pretrain_{settings.model_size}_{settings.cache_key()}.pt")
    if os.path.exists(path):
        return torch.load(path, map_location="cpu", weights_only=True), True
    corpus = stdlib_source_bytes(stream_bytes(settings.steps, settings.batch_size, settings.seq_len), settings.seed)
    model = build_model(settings.model_size, settings.seq_len, settings.seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    recipe = settings.recipe
    scheduler = scheduled(optimizer, max(1, round(recipe.warmup_share * settings.steps)), settings.steps,
                          recipe.final_lr_share)
    generator = torch.Generator().manual_seed(settings.seed)
    batches = window_batches(corpus, settings.batch_size, settings.seq_len, settings.steps, generator)
    bar = tqdm(batches, total=settings.steps, desc=f"pre-train {settings.model_size} on stdlib sources",
               disable=not progress)
    for batch in bar:
        loss = next_byte_loss(model, batch.to(device))
        loss.backward()
        clip_gradients(model, recipe.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    temporary = path + ".tmp"
    torch.save(state, temporary)
    os.replace(temporary, path)
    return state, False


def train_run(
    spec: MethodSpec,
    seed: int,
    initial_state: dict[str, Tensor] | None,
    model_size: str,
    optim_settings: OptimSettings,
    settings: LoopSettings,
    train_data: Tensor,
    validation_windows: Tensor,
    test_windows: Tensor,
    device: torch.device,
    progress: bool,
) -> dict:
    """Train one (method, learning rate, seed); return its measurements (see docs/benchmarks.md).

    Starts from ``initial_state`` (the fine-tuning regime's pre-trained model), or from a random
    initialisation seeded with ``seed`` when it is None (the pre-training regime). The curve is the
    validation loss; the test loss is evaluated once, at the end.
    """
    model = build_model(model_size, settings.seq_len, seed=seed)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    model.to(device)
    validation_windows, test_windows = validation_windows.to(device), test_windows.to(device)
    next_byte_loss(model, validation_windows[: settings.batch_size]).backward()  # untimed warm-up of the kernels
    model.zero_grad(set_to_none=True)
    optimizer = spec.build(model, optim_settings, seed)
    scheduler = scheduled(optimizer, settings.warmup_steps, settings.steps, settings.final_lr_share)
    generator = torch.Generator().manual_seed(seed)
    batches = window_batches(train_data, settings.batch_size, settings.seq_len, settings.steps, generator)
    timer = RefreshTimer(device)
    curve = [(0, heldout_loss(model, validation_windows, settings.eval_batch_size))]
    train_losses: list[float] = []
    peak = {"params": 0, "grads": 0, "state": 0}
    train_seconds = step_seconds = 0.0
    cpu_start = time.process_time()
    bar = tqdm(range(1, settings.steps + 1), desc=f"{spec.name} lr {optim_settings.lr:g} seed {seed}",
               disable=not progress, leave=False)
    with timer.patched():
        for step, batch in zip(bar, batches):
            batch = batch.to(device)
            synchronize(device)
            start = time.perf_counter()
            loss = next_byte_loss(model, batch)
            # Adapter hooks (docs/adapters.md): a method's own loss term (AdaLoRA's orthogonality regulariser) is
            # added to the loss, and its work after the optimizer step (AdaLoRA's budget allocation) runs before
            # zero_grad, timed as part of the step. Both do nothing for other methods.
            (loss + adapter_loss(model)).backward()
            clip_gradients(model, settings.clip)
            synchronize(device)
            step_start = time.perf_counter()
            optimizer.step()
            adapter_step(model, step)
            synchronize(device)
            end = time.perf_counter()
            train_seconds += end - start
            step_seconds += end - step_start
            now = training_bytes(model, optimizer)
            if sum(now.values()) > sum(peak.values()):
                peak = now
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            train_losses.append(loss.item())
            if step % settings.eval_every == 0 or step == settings.steps:
                curve.append((step, heldout_loss(model, validation_windows, settings.eval_batch_size)))
                bar.set_postfix(validation=f"{curve[-1][1]:.3f}", refresh=False)
    cpu_seconds = time.process_time() - cpu_start
    test_loss = heldout_loss(model, test_windows, settings.eval_batch_size)
    variants = {} if spec.variants is None else spec.variants(
        model, lambda variant: heldout_loss(variant, test_windows, settings.eval_batch_size))
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        "method": spec.name,
        "seed": seed,
        "lr": optim_settings.lr,
        "status": "ok",
        "validation_loss": curve[-1][1],
        "test_loss": test_loss,
        "variant_test_losses": variants,
        "train_seconds": train_seconds,
        "cpu_seconds": cpu_seconds,  # the process's CPU time for the whole loop (evaluations included)
        "step_ms": 1000 * step_seconds / settings.steps,
        "refresh_seconds": timer.seconds,
        "refresh_calls": timer.calls,
        "refresh_share": timer.seconds / step_seconds if step_seconds > 0 else 0.0,
        "peak_bytes": peak,
        "trainable_bytes": sum(p.nbytes for p in trainable),
        "state_bytes": training_bytes(model, optimizer)["state"],
        "curve": curve,
        "train_losses": train_losses,
    }
