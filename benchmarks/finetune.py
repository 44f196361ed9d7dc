"""The main job: train a small LLaMA with every method, each at its own validated learning rate; compare test loss, time and memory.

Two regimes: ``pretrain`` (default) trains from scratch on the standard library's sources for 20
tokens per parameter (the field's horizon; no byte seen twice) with GaLore's recipe; ``finetune``
fine-tunes a model pre-trained that far (cached) on the English help topics of ``pydoc_data``. For
each method, every learning rate of its grid is run with the first seed, the grid is widened while
the best lies on its edge, and the one with the lowest validation loss is kept; the other seeds then
run at that learning rate, and the table reports the loss on a separate test split. Run with
``--help`` for the flags; docs/benchmarks.md explains the setup and the latest results. Nothing is
downloaded: the corpora ship with Python.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import glob
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from dataclasses import asdict

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .methods import ALL_METHODS, PROJECTED_LR_GRIDS, MethodSpec, OptimSettings, method_sets, resolve_methods, unavailable_reason
from .models import MODEL_SIZES, build_model, max_rank
from .report import (add_gaps, choose_lr, lr_sweep_markdown, markdown_table, regime_label, summarize, widened_lr,
                     write_plots, write_tables)
from .text_data import eval_windows, pydoc_topic_splits, stdlib_source_splits, stream_bytes
from .training import LoopSettings, PretrainSettings, Recipe, pretrained_state, train_run

REGIMES = ("pretrain", "finetune")
DEFAULT_STEPS = {"finetune": 150}  # pretrain: from --tokens-per-param
DEFAULT_GAP = {"finetune": 50, "pretrain": 200}
DEFAULT_LR_GRID = {"finetune": (1e-3, 3e-3, 1e-2, 3e-2), "pretrain": (1e-3, 3e-3, 1e-2)}
HELDOUT_BYTES = 32_000  # validation and test bytes each, pre-training regime


def _grid_text(grid: tuple[float, ...]) -> str:
    return " ".join(f"{lr:g}" for lr in grid)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {__package__}.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--regime", choices=REGIMES, default="pretrain",
                        help="pretrain: every method trains the model from scratch on the stdlib sources; finetune: a "
                             "cached model pre-trained to --pretrain-tokens-per-param fine-tuned on pydoc topics "
                             "(default: %(default)s)")
    parser.add_argument("--model-size", choices=list(MODEL_SIZES), default="mini",
                        help="decoder size, see benchmarks/models.py (default: %(default)s)")
    parser.add_argument("--tokens-per-param", type=float, default=20.0,
                        help="pretrain regime: training tokens per model parameter, which sets the steps (default: "
                             "%(default)s, the field's horizon; under 3 is early training)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run, instead of --tokens-per-param (default: finetune "
                             f"{DEFAULT_STEPS['finetune']}, pretrain from --tokens-per-param)")
    parser.add_argument("--rank", type=int, default=None,
                        help="rank of every low-rank method: GaLore-type, LoRA, DoRA (default: hidden size / 4)")
    parser.add_argument("--methods", nargs="+", default=["default"],
                        help=f"method names or sets ({', '.join(method_sets())}) (default: default); "
                             f"methods: {', '.join(ALL_METHODS)}")
    learning_rate = parser.add_mutually_exclusive_group()
    learning_rate.add_argument("--lr-grid", nargs="+", type=float, default=None,
                               help="peak learning rates tried for every method; each method keeps the one with the "
                                    "lowest validation loss (default: " + "; ".join(
                                        f"{k} {_grid_text(v)}" for k, v in DEFAULT_LR_GRID.items()) +
                                    f"; GaLore-type methods pretrain {_grid_text(PROJECTED_LR_GRIDS['pretrain'])})")
    learning_rate.add_argument("--lr", type=float, default=None,
                               help="one peak learning rate for every method, no selection (instead of --lr-grid)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="seeds (data order, initialisation, projector and adapter seeds); the first one selects the "
                             "learning rate (default: 0 1 2)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default=None, help="output folder (default: results/<regime>)")
    parser.add_argument("--cache-dir", default=os.path.join("results", "cache"),
                        help="folder of the pre-trained model cache (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="keep the finished runs found in --out")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the tables from the finished runs in --out (implies --resume); "
                             "a method with a missing run of its lr grid is listed as not run")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size in windows (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128, help="bytes per window (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: steps // 10)")
    parser.add_argument("--final-lr-share", type=float, default=0.1,
                        help="the cosine schedule ends at this share of the peak lr (default: %(default)s)")
    parser.add_argument("--clip", type=float, default=1.0,
                        help="global gradient-norm clipping, 0 for none (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=0.0,
                        help="decoupled weight decay of every method (default: %(default)s)")
    parser.add_argument("--update-proj-gap", type=int, default=None,
                        help="steps between projector refreshes of the GaLore-type methods (default: " +
                             ", ".join(f"{k} {v}" for k, v in DEFAULT_GAP.items()) + ")")
    parser.add_argument("--scale", type=float, default=0.25,
                        help="update scale of the GaLore-type methods, Fira's alpha (default: %(default)s)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA/DoRA alpha (default: rank, i.e. scaling 1)")
    parser.add_argument("--eval-every", type=int, default=50,
                        help="steps between validation evaluations, the loss curves (default: %(default)s)")
    parser.add_argument("--eval-windows", type=int, default=128,
                        help="validation windows, and test windows, at most (default: %(default)s each)")
    parser.add_argument("--widen", type=int, default=2,
                        help="times a method's lr grid is extended by one step beyond an edge where the best lr lies "
                             "(default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each in its own process with --threads threads (default: "
                             "%(default)s; 2 on an idle 2-core machine)")
    parser.add_argument("--pretrain-tokens-per-param", type=float, default=20.0,
                        help="finetune regime: tokens per parameter of the cached pre-training (default: %(default)s)")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="finetune regime: steps of the cached pre-training, instead of "
                             "--pretrain-tokens-per-param")
    parser.add_argument("--pretrain-batch-size", type=int, default=16,
                        help="finetune regime: batch of the cached pre-training (default: %(default)s)")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3,
                        help="finetune regime: AdamW learning rate of the cached pre-training (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads, 0 for torch's default. On a small or shared CPU, threads beyond "
                             "the free cores make every matmul wait on the others, so 1 gives the steadiest timings "
                             "(default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


@functools.lru_cache(maxsize=None)
def parameter_count(size: str, seq_len: int) -> int:
    """Parameters of the benchmark's model of ``size``."""
    return sum(p.numel() for p in build_model(size, seq_len, seed=0).parameters())


def steps_for(tokens_per_param: float, parameters: int, batch_size: int, seq_len: int) -> int:
    """Steps of batch ``batch_size`` x ``seq_len`` tokens that train ``tokens_per_param`` tokens per parameter."""
    return max(1, math.ceil(tokens_per_param * parameters / (batch_size * seq_len)))


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on the regime, the model or the machine."""
    _require_positive(args, "batch_size", "seq_len", "pretrain_batch_size")
    parameters = parameter_count(args.model_size, args.seq_len)
    if args.steps is None:
        args.steps = (DEFAULT_STEPS.get(args.regime) or
                      steps_for(args.tokens_per_param, parameters, args.batch_size, args.seq_len))
    if args.pretrain_steps is None:
        args.pretrain_steps = steps_for(args.pretrain_tokens_per_param, parameters, args.pretrain_batch_size,
                                        args.seq_len)
    if args.rank is None:
        args.rank = max(1, MODEL_SIZES[args.model_size][0] // 4)
    if args.update_proj_gap is None:
        args.update_proj_gap = DEFAULT_GAP[args.regime]
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.out is None:
        args.out = os.path.join("results", args.regime)
    if args.report_only:
        args.resume = True


def lr_grid(args: argparse.Namespace, spec: MethodSpec) -> tuple[float, ...]:
    """The learning rates tried for ``spec``: ``--lr``, else ``--lr-grid``, else its own grid for the regime, else the
    regime's default."""
    if args.lr is not None:
        return (args.lr,)
    if args.lr_grid is not None:
        return tuple(args.lr_grid)
    return spec.lr_grids.get(args.regime, DEFAULT_LR_GRID[args.regime])


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
                      "pretrain_batch_size", "jobs")
    if not (math.isfinite(args.tokens_per_param) and args.tokens_per_param > 0):
        raise ValueError(f"--tokens-per-param must be > 0, got {args.tokens_per_param}")
    if not 0 <= args.final_lr_share <= 1:
        raise ValueError(f"--final-lr-share must be in [0, 1], got {args.final_lr_share}")
    if args.clip < 0 or args.widen < 0:
        raise ValueError(f"--clip and --widen must be >= 0, got {args.clip} and {args.widen}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.pretrain_steps < 0:
        raise ValueError(f"--pretrain-steps must be >= 0, got {args.pretrain_steps}")
    if args.rank > max_rank(args.model_size):
        raise ValueError(f"--rank {args.rank} is larger than model size {args.model_size!r} allows: its smallest linear "
                         f"side is {max_rank(args.model_size)}; lower --rank or pick a larger --model-size")
    rates = [("--lr", args.lr), ("--pretrain-lr", args.pretrain_lr)] + [("--lr-grid", lr) for lr in args.lr_grid or ()]
    for flag, lr in rates:
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"{flag} must be > 0, got {lr}")
    if args.lr_grid is not None and len(set(args.lr_grid)) != len(args.lr_grid):
        raise ValueError(f"--lr-grid has repeats: {args.lr_grid}")
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
    """The settings a finished run depends on (compared on --resume). A run file is named by its method, lr and
    seed, so --methods, --seeds, --lr and --lr-grid may change between resumed invocations."""
    skip = {"methods", "seeds", "lr", "lr_grid", "out", "resume", "report_only", "quiet", "cache_dir", "jobs", "widen"}
    return {key: value for key, value in sorted(vars(args).items()) if key not in skip}


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
    """Run the comparison; return ``{"rows": summary rows, "runs": every run, "files": written paths}``."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        resolve_defaults(args)
        settings = run_settings(args)
        specs = validate(args)
        prepare_out(args, settings)
    except ValueError as error:
        parser.error(str(error))
    previous_threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return run(args, specs, settings, command=" ".join([f"python -m {__package__}.finetune", *argv]))
    finally:
        torch.set_num_threads(previous_threads)


def recipe(args: argparse.Namespace) -> Recipe:
    return Recipe(warmup_share=0.1, final_lr_share=args.final_lr_share, clip=args.clip)


def pretrain_settings(args: argparse.Namespace) -> PretrainSettings:
    """The fine-tuning regime's cached pre-training: AdamW with the recipe at ``--pretrain-lr``."""
    return PretrainSettings(args.model_size, args.seq_len, args.pretrain_steps, args.pretrain_batch_size,
                            args.pretrain_lr, recipe(args), seed=0, python=platform.python_version())


def regime_notes(args: argparse.Namespace) -> dict:
    """What the tables say about the regime: parameters, tokens per run and per parameter (and of the pre-training)."""
    parameters = parameter_count(args.model_size, args.seq_len)
    tokens = args.steps * args.batch_size * args.seq_len
    notes = {"parameters": parameters, "tokens_per_run": tokens, "tokens_per_param": tokens / parameters}
    if args.regime == "finetune":
        notes["base_tokens_per_param"] = args.pretrain_steps * args.pretrain_batch_size * args.seq_len / parameters
    return notes


def regime_data(args: argparse.Namespace, device: torch.device, progress: bool
                ) -> tuple[dict[str, Tensor] | None, Tensor, Tensor, Tensor, dict]:
    """(initial model state or None for from scratch, train bytes, validation windows, test windows, notes for the
    record: the pre-training's settings, whether it came from the cache, its seconds)."""
    notes = {}
    if args.regime == "pretrain":
        train, validation, test = stdlib_source_splits(stream_bytes(args.steps, args.batch_size, args.seq_len),
                                                       HELDOUT_BYTES)
        initial_state = None
    else:
        pretrain = pretrain_settings(args)
        started = time.perf_counter()
        initial_state, cached = pretrained_state(pretrain, args.cache_dir, device, progress)
        train, validation, test = pydoc_topic_splits()
        notes.update(pretrain=asdict(pretrain), pretrain_cached=cached,
                     pretrain_seconds=None if cached else time.perf_counter() - started)
    windows = [eval_windows(part, args.seq_len, args.eval_windows) for part in (validation, test)]
    return initial_state, train, windows[0], windows[1], notes


_WORKER: dict = {}


def _start_worker(args: argparse.Namespace) -> None:
    """A --jobs process: its threads, and the regime's data (the cached pre-training exists by then)."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    _WORKER["args"] = args
    _WORKER["data"] = regime_data(args, torch.device(args.device), progress=False)[:4]


def _run_path(out: str, method: str, lr: float, seed: int) -> str:
    return os.path.join(out, "runs", f"{method}__lr{lr:g}__seed{seed}.json")


def _train_one(method: str, lr: float, seed: int) -> dict:
    """Train one (method, lr, seed) with the process's data; write its record. Failures are records too."""
    args = _WORKER["args"]
    initial_state, train_data, validation_windows, test_windows = _WORKER["data"]
    spec = ALL_METHODS[method]
    loop = LoopSettings(args.steps, args.batch_size, args.seq_len,
                        args.steps // 10 if args.warmup_steps is None else args.warmup_steps,
                        args.eval_every, eval_batch_size=32, final_lr_share=args.final_lr_share, clip=args.clip)
    optim_settings = OptimSettings(lr, args.weight_decay, args.rank, args.update_proj_gap, args.scale, args.lora_alpha,
                                   args.steps)
    try:
        record = train_run(spec, seed, initial_state, args.model_size, optim_settings, loop, train_data,
                           validation_windows, test_windows, torch.device(args.device),
                           not args.quiet and args.jobs == 1)
    except Exception as error:  # a broken method is reported in the table (and retried on --resume)
        record = {"method": method, "seed": seed, "lr": lr, "status": "failed", "reason": f"{type(error).__name__}: {error}"}
        tqdm.write(f"{method} lr {lr:g} seed {seed}: failed: {record['reason']}")
        return record
    if not args.quiet:
        tqdm.write(f"{method} lr {lr:g} seed {seed}: validation {record['validation_loss']:.4f}, "
                   f"test {record['test_loss']:.4f}, {record['train_seconds']:.1f} s")
    with open(_run_path(args.out, method, lr, seed), "w") as handle:
        json.dump(record, handle)
    return record


class RunPool:
    """Trains (method, lr, seed) triples, ``--jobs`` at a time in processes of their own, keeping the finished runs
    found on --resume and training nothing on --report-only."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.runs: dict[tuple[str, float, int], dict] = {}
        self.executor = None
        if args.jobs > 1 and not args.report_only:
            context = multiprocessing.get_context("spawn")
            self.executor = concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context,
                                                                   initializer=_start_worker, initargs=(args,))

    def _saved(self, key: tuple[str, float, int]) -> dict | None:
        path = _run_path(self.args.out, *key)
        if self.args.resume and os.path.exists(path):
            with open(path) as handle:
                return json.load(handle)
        if self.args.report_only:
            method, lr, seed = key
            return {"method": method, "seed": seed, "lr": lr, "status": "not run", "reason": f"lr {lr:g} seed {seed}"}
        return None

    def train(self, keys: list[tuple[str, float, int]]) -> list[dict]:
        """The records of ``keys``, in order, training those not finished yet."""
        todo = [key for key in dict.fromkeys(keys) if key not in self.runs]
        for key in todo:
            saved = self._saved(key)
            if saved is not None:
                self.runs[key] = saved
        todo = [key for key in todo if key not in self.runs]
        if self.executor is None:
            for key in todo:
                self.runs[key] = _train_one(*key)
        else:
            futures = {key: self.executor.submit(_train_one, *key) for key in todo}
            for key, future in futures.items():
                self.runs[key] = future.result()
        return [self.runs[key] for key in keys]

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()


def select_lrs(pool: RunPool, specs: list[MethodSpec], grids: dict[str, tuple[float, ...]], seed: int,
               widen: int) -> dict[str, tuple[float, ...]]:
    """Train every method's grid with ``seed``, then extend each grid by one step beyond the edge where its best lr
    lies, up to ``widen`` times, all methods at once; return the lrs tried per method."""
    tried = {spec.name: tuple(sorted(grids[spec.name])) for spec in specs}
    for extension in range(widen + 1):
        selection = pool.train([(name, lr, seed) for name, rates in tried.items() for lr in rates])
        if extension == widen:
            break
        extended = {}
        for name, rates in tried.items():
            runs = [run for run in selection if run["method"] == name]
            if any(run["status"] == "not run" for run in runs):
                continue
            new = widened_lr(rates, choose_lr(runs))
            if new is not None:
                extended[name] = tuple(sorted(rates + (new,)))
        if not extended:
            break
        tried.update(extended)
    return tried


def run(args: argparse.Namespace, specs: list[MethodSpec], settings: dict, command: str) -> dict:
    """Train every (method, lr) with the first seed, widen grids whose best lies on an edge, keep each method's best
    lr on validation, run the other seeds there; write the tables and plots."""
    started = time.perf_counter()
    device = torch.device(args.device)
    notes = regime_notes(args)
    _WORKER.update(args=args)
    if not args.report_only:
        data = regime_data(args, device, not args.quiet)  # caches the pre-training before any worker starts
        notes.update(data[4])
        _WORKER.update(data=data[:4])
    pool = RunPool(args)
    runs: list[dict] = []
    chosen: dict[str, float | None] = {}
    selection_seed, other_seeds = args.seeds[0], args.seeds[1:]
    available = []
    for spec in specs:
        reason = unavailable_reason(spec)
        if reason is None:
            available.append(spec)
        else:
            runs.append({"method": spec.name, "seed": selection_seed, "lr": None, "status": "unavailable", "reason": reason})
    try:
        tried = select_lrs(pool, available, {spec.name: lr_grid(args, spec) for spec in available}, selection_seed,
                           0 if args.lr is not None else args.widen)
        for spec in available:
            selection = pool.train([(spec.name, lr, selection_seed) for lr in tried[spec.name]])
            if not any(run["status"] == "not run" for run in selection):
                chosen[spec.name] = choose_lr(selection)
        pool.train([(name, lr, seed) for name, lr in chosen.items() if lr is not None for seed in other_seeds])
    finally:
        pool.close()
    runs.extend(pool.runs.values())
    grids = {spec.name: tried.get(spec.name, lr_grid(args, spec)) for spec in specs}
    rows = [summarize(spec.name, [run for run in runs if run["method"] == spec.name], chosen.get(spec.name),
                      grids[spec.name], spec.description) for spec in specs]
    add_gaps(rows, runs)
    meta = dict(settings, **notes, methods=[spec.name for spec in specs], seeds=args.seeds, torch=torch.__version__,
                machine=platform.machine(), cpus=os.cpu_count(), command=command,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), seconds=time.perf_counter() - started,
                cpu_seconds=sum(run.get("cpu_seconds", 0.0) for run in pool.runs.values()))
    files = write_tables(rows, runs, meta, args.out)
    files.update({os.path.basename(path): path for path in write_plots(rows, runs, meta, args.out)})
    print(regime_label(meta))
    print(markdown_table(rows))
    print(lr_sweep_markdown(rows, runs, selection_seed))
    cached = notes.get("pretrain_cached")
    print(f"{meta['seconds']:.0f} s in all" + ("" if cached is None else
          f" (pre-training {'loaded from cache' if cached else 'included'})") + "; wrote " + ", ".join(sorted(files.values())))
    return {"rows": rows, "runs": runs, "files": files}


if __name__ == "__main__":
    main()
