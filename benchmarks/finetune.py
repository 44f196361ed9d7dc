"""The main job: fine-tune a small pre-trained LLaMA with every method and compare loss, time and memory.

Run ``python -m benchmarks.finetune --help`` for the flags; docs/benchmarks.md explains the setup,
the measurements and the latest results. Nothing is downloaded: the corpora ship with Python.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from .methods import ALL_METHODS, METHOD_SETS, MethodSpec, OptimSettings, resolve_methods, unavailable_reason
from .models import MODEL_SIZES, max_rank
from .report import ablation_markdown, markdown_table, summarize, write_plots, write_tables
from .text_data import eval_windows, pydoc_topic_bytes
from .training import FinetuneSettings, PretrainSettings, finetune_run, pretrained_state


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.finetune", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-size", choices=list(MODEL_SIZES), default="small", help="decoder size (see benchmarks/models.py)")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps per method and seed")
    parser.add_argument("--rank", type=int, default=32, help="rank of every low-rank method (GaLore, GaLore+, LoRA, DoRA)")
    parser.add_argument("--methods", nargs="+", default=["all"],
                        help=f"method names or sets ({', '.join(METHOD_SETS)}); methods: {', '.join(ALL_METHODS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="fine-tuning seeds (data order, adapter init, projector seed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--out", default=os.path.join("results", "finetune"), help="output folder")
    parser.add_argument("--cache-dir", default=os.path.join("results", "cache"), help="folder of the pre-trained model cache")
    parser.add_argument("--resume", action="store_true", help="keep the finished (method, seed) runs found in --out")
    parser.add_argument("--batch-size", type=int, default=8, help="fine-tuning batch size (windows)")
    parser.add_argument("--seq-len", type=int, default=128, help="bytes per window")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of every method (cosine schedule)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: steps // 10)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay of every method")
    parser.add_argument("--update-proj-gap", type=int, default=50, help="steps between projector refreshes (GaLore, GaLore+)")
    parser.add_argument("--scale", type=float, default=0.25, help="GaLore/GaLore+ update scale")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA/DoRA alpha (default: rank, i.e. scaling 1)")
    parser.add_argument("--eval-every", type=int, default=25, help="steps between held-out evaluations")
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows evaluated")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="pre-training steps on the stdlib sources")
    parser.add_argument("--pretrain-batch-size", type=int, default=16)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--pretrain-bytes", type=int, default=4_000_000, help="bytes of stdlib sources used for pre-training")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's default). On a small or shared CPU, threads beyond the "
                             "free cores make every matmul wait on the others, so 1 gives the steadiest timings")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _require_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def _require_writable(folder: str, flag: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, ".write_probe")
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"{flag} {folder!r} is not a writable folder: {error}") from None


def validate(args: argparse.Namespace) -> list[MethodSpec]:
    """Check every flag before anything is trained; return the methods to run."""
    specs = resolve_methods(args.methods)
    _require_positive(args, "steps", "rank", "batch_size", "seq_len", "update_proj_gap", "eval_every", "eval_windows",
                      "pretrain_batch_size", "pretrain_bytes")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.pretrain_steps < 0:
        raise ValueError(f"--pretrain-steps must be >= 0, got {args.pretrain_steps}")
    if args.rank > max_rank(args.model_size):
        raise ValueError(f"--rank {args.rank} is larger than model size {args.model_size!r} allows: its smallest linear "
                         f"side is {max_rank(args.model_size)}; lower --rank or pick a larger --model-size")
    if args.lr <= 0 or args.pretrain_lr <= 0:
        raise ValueError(f"--lr and --pretrain-lr must be > 0, got {args.lr} and {args.pretrain_lr}")
    if args.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.warmup_steps is not None and not 0 <= args.warmup_steps <= args.steps:
        raise ValueError(f"--warmup-steps must be in [0, --steps], got {args.warmup_steps}")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds has repeats: {args.seeds}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(f"--device {args.device!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r}: CUDA is not available on this machine; use --device cpu")
    _require_writable(args.out, "--out")
    _require_writable(args.cache_dir, "--cache-dir")
    return specs


def run_settings(args: argparse.Namespace) -> dict:
    """The settings a finished run depends on (compared on --resume)."""
    skip = {"methods", "seeds", "out", "resume", "quiet", "cache_dir"}
    return {key: value for key, value in sorted(vars(args).items()) if key not in skip}


def _run_path(out: str, method: str, seed: int) -> str:
    return os.path.join(out, "runs", f"{method}__seed{seed}.json")


def prepare_out(args: argparse.Namespace, settings: dict) -> None:
    """Start a fresh run folder, or check on --resume that the saved runs were made with the same settings."""
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    settings_path = os.path.join(args.out, "settings.json")
    if args.resume and os.path.exists(settings_path):
        with open(settings_path) as handle:
            saved = json.load(handle)
        changed = {key: (saved.get(key), value) for key, value in settings.items() if saved.get(key) != value}
        if changed:
            raise ValueError(f"--resume: {args.out!r} holds runs made with other settings (saved vs now: {changed}); "
                             "use another --out or drop --resume")
    elif not args.resume:
        for path in glob.glob(os.path.join(args.out, "runs", "*.json")):
            os.remove(path)
    with open(settings_path, "w") as handle:
        json.dump(settings, handle, indent=1)


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison; return ``{"rows": summary rows, "runs": per-seed runs, "files": written paths}``."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = run_settings(args)
    try:
        specs = validate(args)
        prepare_out(args, settings)
    except ValueError as error:
        parser.error(str(error))
    previous_threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return run(args, specs, settings, command=" ".join(["python -m benchmarks.finetune", *argv]))
    finally:
        torch.set_num_threads(previous_threads)


def run(args: argparse.Namespace, specs: list[MethodSpec], settings: dict, command: str) -> dict:
    """Pre-train (or load the cache), fine-tune every (method, seed), write the tables and plots."""
    started = time.perf_counter()
    device = torch.device(args.device)
    progress = not args.quiet
    pretrain = PretrainSettings(args.model_size, args.seq_len, args.pretrain_steps, args.pretrain_batch_size,
                                args.pretrain_lr, args.pretrain_bytes, seed=0, python=platform.python_version())
    base_state, pretrain_cached = pretrained_state(pretrain, args.cache_dir, device, progress)
    train_data, heldout_data = pydoc_topic_bytes()
    windows = eval_windows(heldout_data, args.seq_len, args.eval_windows)
    optim_settings = OptimSettings(args.lr, args.weight_decay, args.rank, args.update_proj_gap, args.scale, args.lora_alpha)
    loop = FinetuneSettings(args.steps, args.batch_size, args.seq_len,
                            args.steps // 10 if args.warmup_steps is None else args.warmup_steps,
                            args.eval_every, eval_batch_size=32)

    runs = []
    for spec in tqdm(specs, desc="methods", disable=not progress):
        reason = unavailable_reason(spec)
        for seed in args.seeds:
            if reason is not None:
                runs.append({"method": spec.name, "seed": seed, "status": "unavailable", "reason": reason})
                continue
            path = _run_path(args.out, spec.name, seed)
            if args.resume and os.path.exists(path):
                with open(path) as handle:
                    runs.append(json.load(handle))
                continue
            try:
                record = finetune_run(spec, seed, base_state, args.model_size, optim_settings, loop, train_data, windows,
                                      device, progress)
            except Exception as error:  # a broken method is reported in the table (and retried on --resume)
                record = {"method": spec.name, "seed": seed, "status": "failed", "reason": f"{type(error).__name__}: {error}"}
                tqdm.write(f"{spec.name} seed {seed}: failed: {record['reason']}")
            else:
                tqdm.write(f"{spec.name} seed {seed}: held-out loss {record['heldout_loss']:.4f}, "
                           f"{record['train_seconds']:.1f} s")
                with open(path, "w") as handle:
                    json.dump(record, handle)
            runs.append(record)

    rows = [summarize(spec.name, [run for run in runs if run["method"] == spec.name]) for spec in specs]
    meta = dict(settings, methods=[spec.name for spec in specs], seeds=args.seeds, pretrain=asdict(pretrain),
                pretrain_cached=pretrain_cached, torch=torch.__version__, machine=platform.machine(),
                cpus=os.cpu_count(), command=command, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                seconds=time.perf_counter() - started)
    files = write_tables(rows, runs, meta, args.out)
    files.update({os.path.basename(path): path for path in write_plots(rows, runs, args.out)})
    print(markdown_table(rows))
    print(ablation_markdown(rows))
    print(f"{meta['seconds']:.0f} s in all (pre-training {'loaded from cache' if pretrain_cached else 'included'}); "
          "wrote " + ", ".join(sorted(files.values())))
    return {"rows": rows, "runs": runs, "files": files}


if __name__ == "__main__":
    main()
